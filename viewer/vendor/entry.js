// Entry point of the vendored bundle (build-time only; see build.sh).
//
// 1. Re-exports hyparquet.
// 2. Adds a ZSTD decompressor, because hyparquet itself reads only
//    uncompressed and snappy pages: zstddec (the reference zstd decoder in
//    WebAssembly, ~7x faster here than the pure-JS fzstd) once initZstd() has
//    loaded it, fzstd before that and wherever WebAssembly is not allowed.
// 3. Adds scanFlatColumn, a page-by-page reader for flat (non-nested) columns
//    built from hyparquet's own page decoders. hyparquet's parquetRead
//    assembles every OPTIONAL column through its generic nested-list code into
//    plain JS arrays and dereferences every dictionary index into a string;
//    on the 2.58M-row prototype file that took 3.6 s. scanFlatColumn hands the
//    caller dictionary pages once and the raw dictionary indices / typed values
//    per page, so the viewer fills compact typed arrays directly.
import { decompress } from 'fzstd'
import { ZSTDDecoder } from 'zstddec'
import { parquetHeader } from './node_modules/hyparquet/src/column.js'
import { convert, DEFAULT_PARSERS } from './node_modules/hyparquet/src/convert.js'
import { decompressPage, readDataPage, readDataPageV2 } from './node_modules/hyparquet/src/datapage.js'
import { readPlain } from './node_modules/hyparquet/src/plain.js'
import { getMaxDefinitionLevel, getMaxRepetitionLevel, getSchemaPath } from './node_modules/hyparquet/src/schema.js'

export * from 'hyparquet'

let wasmZstd = null

/**
 * Load the WebAssembly ZSTD decoder (its module is inside this file, read
 * through a data: URL). Resolves true when it is in use, false when the page
 * does not allow WebAssembly (e.g. a Content-Security-Policy without
 * 'wasm-unsafe-eval'): ZSTD pages are then decoded by fzstd.
 */
export async function initZstd() {
  if (wasmZstd) return true
  try {
    const decoder = new ZSTDDecoder()
    await decoder.init()
    wasmZstd = decoder
    return true
  } catch (e) {
    return false
  }
}

/** Which ZSTD decoder is in use: 'wasm' or 'js'. */
export function zstdDecoder() { return wasmZstd ? 'wasm' : 'js' }

/** Decompressors to pass as `compressors` to hyparquet's read functions. */
export const compressors = {
  // hyparquet gives the exact uncompressed page size: both decoders fill a
  // buffer of that size; a page that decodes to another size is corrupt.
  ZSTD: (input, outputLength) => {
    if (!wasmZstd) return decompress(input, new Uint8Array(outputLength))
    const out = wasmZstd.decode(input, outputLength)
    if (out.length !== outputLength) throw new Error(`zstd page decoded to ${out.length} bytes, expected ${outputLength}`)
    return out
  },
}

/**
 * Read one flat column of an in-memory parquet file, page by page.
 *
 * sink.dictionary(values): called for each dictionary page with its decoded
 *   values (strings for UTF8 byte arrays, numbers, or BigInts for INT64).
 * sink.page(rowStart, numValues, defLevels, maxDef, values, isDictIndices):
 *   called for each data page. defLevels is empty/undefined when the page has
 *   no nulls; otherwise values holds only the non-null entries, in order.
 *   When isDictIndices is true, values are indices into the last dictionary.
 *
 * @param {ArrayBuffer} file whole parquet file
 * @param {object} metadata from parquetMetadata(file)
 * @param {string} name top-level column name
 * @param {object} sink see above
 * @param {object} [codecs] decompressors (defaults to `compressors`)
 * @param {number[]} [groups] read only these row groups (default: all)
 */
export function scanFlatColumn(file, metadata, name, sink, codecs = compressors, groups = null) {
  const schemaPath = getSchemaPath(metadata.schema, [name])
  if (schemaPath.length !== 2 || getMaxRepetitionLevel(schemaPath)) {
    throw new Error(`column ${name} is nested; only flat columns are supported`)
  }
  const element = schemaPath[1].element
  const maxDef = getMaxDefinitionLevel(schemaPath)
  let groupStart = 0
  for (let g = 0; g < metadata.row_groups.length; g++) {
    const rg = metadata.row_groups[g]
    const groupRows = Number(rg.num_rows)
    if (groups && !groups.includes(g)) { groupStart += groupRows; continue }
    const chunk = rg.columns.find(c => c.meta_data && c.meta_data.path_in_schema.length === 1 &&
      c.meta_data.path_in_schema[0] === name)
    if (!chunk) throw new Error(`column ${name} missing from a row group`)
    if (chunk.file_path) throw new Error('parquet file_path (external column chunks) not supported')
    const meta = chunk.meta_data
    const decoder = {
      pathInSchema: meta.path_in_schema, element, schemaPath, type: meta.type,
      codec: meta.codec, compressors: codecs, parsers: DEFAULT_PARSERS, utf8: true,
    }
    const start = Number(meta.dictionary_page_offset || meta.data_page_offset)
    const length = Number(meta.total_compressed_size)
    if (start + length > file.byteLength) throw new Error('parquet column chunk lies outside the file (truncated file?)')
    const reader = { view: new DataView(file, start, length), offset: 0 }
    let rows = 0
    while (rows < groupRows && reader.offset < length) {
      const header = parquetHeader(reader)
      const size = header.compressed_page_size
      const bytes = new Uint8Array(file, start + reader.offset, size)
      reader.offset += size
      if (header.type === 'DICTIONARY_PAGE') {
        const page = decompressPage(bytes, Number(header.uncompressed_page_size), meta.codec, codecs)
        const pr = { view: new DataView(page.buffer, page.byteOffset, page.byteLength), offset: 0 }
        const raw = readPlain(pr, meta.type, header.dictionary_page_header.num_values, element.type_length)
        sink.dictionary(convert(raw, decoder))
      } else if (header.type === 'DATA_PAGE' || header.type === 'DATA_PAGE_V2') {
        let res, encoding, n
        if (header.type === 'DATA_PAGE') {
          const daph = header.data_page_header
          const page = decompressPage(bytes, Number(header.uncompressed_page_size), meta.codec, codecs)
          res = fastDataPageV1(page, daph, maxDef, meta.type, element.type_length) ||
            readDataPage(page, daph, decoder)
          encoding = daph.encoding
          n = daph.num_values
        } else {
          res = readDataPageV2(bytes, header, decoder)
          encoding = header.data_page_header_v2.encoding
          n = header.data_page_header_v2.num_values
        }
        const isDict = encoding.endsWith('_DICTIONARY')
        const values = isDict ? res.dataPage : convert(res.dataPage, decoder)
        let defs = res.definitionLevels
        if (defs && defs.length) {
          // V2 pages always return levels; drop them when nothing is null.
          let allSet = true
          for (let i = 0; i < defs.length; i++) if (defs[i] !== maxDef) { allSet = false; break }
          if (allSet) defs = undefined
        }
        sink.page(groupStart + rows, n, defs, maxDef, values, isDict)
        rows += n
      }
      // other page types (INDEX_PAGE) carry no values: skip
    }
    if (rows !== groupRows) throw new Error(`column ${name}: read ${rows} of ${groupRows} rows in a row group`)
    groupStart += groupRows
  }
}

/**
 * Decode a V1 data page of a flat column into typed arrays (Uint8Array
 * definition levels, Int32Array dictionary indices). hyparquet's readDataPage
 * decodes levels and indices into holey JS arrays, which cost ~0.5 s on the
 * 2.58M-row prototype file. Returns null for encodings it does not handle, so
 * the caller falls back to hyparquet.
 */
function fastDataPageV1(page, daph, maxDef, type, typeLength) {
  const enc = daph.encoding
  const isDict = enc === 'RLE_DICTIONARY' || enc === 'PLAIN_DICTIONARY'
  if (!isDict && enc !== 'PLAIN') return null
  if (type === 'BOOLEAN') return null
  const bytes = page
  const view = new DataView(page.buffer, page.byteOffset, page.byteLength)
  const n = daph.num_values
  let off = 0
  let definitionLevels
  let nonNull = n
  if (maxDef) {
    const width = 32 - Math.clz32(maxDef)
    const len = view.getUint32(0, true)
    off = 4
    definitionLevels = new Uint8Array(n)
    if (!readHybrid(bytes, off, off + len, width, definitionLevels, n)) return null
    off += len
    for (let i = 0; i < n; i++) if (definitionLevels[i] !== maxDef) nonNull--
  }
  let dataPage
  if (isDict) {
    const width = bytes[off++]
    dataPage = new Int32Array(nonNull)
    if (width && !readHybrid(bytes, off, bytes.length, width, dataPage, nonNull)) return null
  } else {
    dataPage = readPlain({ view, offset: off }, type, nonNull, typeLength)
  }
  return { definitionLevels, repetitionLevels: [], dataPage }
}

/**
 * Parquet RLE / bit-packed hybrid decoder into a typed array.
 * Returns false (caller falls back) for widths above 24 bits, where the
 * 32-bit shift buffer below would overflow.
 */
function readHybrid(bytes, off, end, width, out, count) {
  if (width > 24) return false
  const mask = width === 32 ? -1 : (1 << width) - 1
  const valueBytes = (width + 7) >> 3
  let i = 0
  while (i < count && off < end) {
    let header = 0
    let shift = 0
    let b
    do {
      b = bytes[off++]
      header += (b & 0x7f) * 2 ** shift
      shift += 7
    } while (b & 0x80)
    if (header % 2 === 1) {
      // bit-packed run: (header >> 1) groups of 8 values, LSB first
      const total = Math.floor(header / 2) * 8
      let buf = 0
      let bits = 0
      for (let k = 0; k < total; k++) {
        while (bits < width) {
          buf |= (off < end ? bytes[off] : 0) << bits
          off++
          bits += 8
        }
        if (i < count) out[i++] = buf & mask
        buf >>>= width
        bits -= width
      }
    } else {
      // RLE run: one value repeated (header >> 1) times
      const run = Math.floor(header / 2)
      let v = 0
      for (let k = 0; k < valueBytes; k++) v |= bytes[off++] << (8 * k)
      const stop = Math.min(count, i + run)
      out.fill(v, i, stop)
      i = stop
    }
  }
  return i === count
}
