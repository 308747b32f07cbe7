// Entry point of the vendored bundle (build-time only; see build.sh).
// Re-exports hyparquet and adds a ZSTD decompressor from fzstd, because
// hyparquet itself reads only uncompressed and snappy pages.
import { decompress } from 'fzstd'

export * from 'hyparquet'

/** Decompressors to pass as `compressors` to hyparquet's read functions. */
export const compressors = {
  // hyparquet gives the exact uncompressed page size, so decode into a
  // buffer of that size (fzstd fills it and returns it).
  ZSTD: (input, outputLength) => decompress(input, new Uint8Array(outputLength)),
}
