// Adapter slots as plain graph inputs (docs/bundle-format.md, "Adapter slots on other bindings").
//
// In model.onnx every slot is a graph input that also has an initializer (its empty default), an
// "overridable initializer". ONNX Runtime's C, C++ and Python APIs accept those by name as feeds,
// but onnxruntime-node only forwards feeds named in session.inputNames, which leaves overridable
// initializers out: an adapter fed by name would be dropped without an error. So, before the
// session is created, this moves each slot's initializer out of the graph (protobuf wire format:
// ModelProto.graph = 7, GraphProto.initializer = 5, TensorProto.name = 8, GraphProto.input = 11;
// an all-zero default is a GraphProto.sparse_initializer = 15 with no values: SparseTensorProto
// values = 1, indices = 2, dims = 3) and keeps its value as the default feed. Everything else in
// the file is copied byte for byte.

import { BundleError } from "./errors.mjs";

function readVarint(buf, pos) {
  let value = 0, scale = 1, b;
  do {
    if (pos >= buf.length) throw new RangeError("truncated varint");
    b = buf[pos++];
    value += (b & 0x7f) * scale;
    scale *= 128;
  } while (b & 0x80 && scale < 2 ** 70);
  return [value, pos];
}

function writeVarint(n) {
  const out = [];
  do {
    let b = n % 128;
    n = Math.floor(n / 128);
    if (n) b |= 0x80;
    out.push(b);
  } while (n);
  return Uint8Array.from(out);
}

// Yield {field, wire, start, end, body:[s, e] | null, value} for each field of a message
function* fields(buf, start = 0, end = buf.length) {
  let pos = start;
  while (pos < end) {
    const at = pos;
    let key, value = null, body = null;
    [key, pos] = readVarint(buf, pos);
    const field = Math.floor(key / 8), wire = key % 8;
    if (wire === 0) [value, pos] = readVarint(buf, pos);
    else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else if (wire === 2) {
      let n;
      [n, pos] = readVarint(buf, pos);
      body = [pos, pos + n];
      pos += n;
    } else throw new RangeError(`unsupported wire type ${wire}`);
    if (pos > end) throw new RangeError("field runs past its message");
    yield { field, wire, start: at, end: pos, body, value };
  }
}

const text = (buf, [s, e]) => new TextDecoder().decode(buf.subarray(s, e));

// TensorProto: dims = 1 (int64, packed or not), data_type = 2, float_data = 4, name = 8, raw_data = 9,
// external_data = 13
function readTensor(buf, [s, e]) {
  const t = { name: "", dims: [], dataType: 0, raw: null, floats: [], external: false };
  for (const f of fields(buf, s, e)) {
    if (f.field === 8 && f.body) t.name = text(buf, f.body);
    else if (f.field === 1 && f.wire === 0) t.dims.push(f.value);
    else if (f.field === 1 && f.body) {
      for (let p = f.body[0], v; p < f.body[1];) { [v, p] = readVarint(buf, p); t.dims.push(v); }
    } else if (f.field === 2 && f.wire === 0) t.dataType = f.value;
    else if (f.field === 9 && f.body) t.raw = buf.subarray(...f.body);
    else if (f.field === 4 && f.body) {
      const bytes = new Uint8Array(buf.subarray(...f.body));
      t.floats = Array.from(new Float32Array(bytes.buffer));
    } else if (f.field === 13) t.external = true;
  }
  return t;
}

// TensorProto data types of slots: 1 = float (LoRA A, heads, fp32 LoRA B), 3 = int8 (LoRA B of int4/int8 bundles)
function defaultValue(t) {
  if (t.dataType !== 1 && t.dataType !== 3) {
    throw new BundleError(`slot ${t.name} has data type ${t.dataType}; this app handles float32 and int8 slots`);
  }
  if (t.external) throw new BundleError(`slot ${t.name} keeps its default in external data`, "rebuild the bundle");
  const count = t.dims.reduce((a, b) => a * b, 1);
  const bytes = t.raw ? new Uint8Array(t.raw) : null;
  const data = t.dataType === 3 ? (bytes ? new Int8Array(bytes.buffer) : new Int8Array(count))
    : bytes ? new Float32Array(bytes.buffer) : Float32Array.from(t.floats);
  if (data.length !== count) throw new BundleError(`slot ${t.name}'s default does not match its shape [${t.dims}]`);
  return { dims: t.dims, type: t.dataType === 3 ? "int8" : "float32", data };
}

// SparseTensorProto: values = 1 (TensorProto), indices = 2, dims = 3. edgepeft writes all-zero slot
// defaults this way (no values); anything with values is refused rather than half-read.
function sparseDefault(buf, [s, e]) {
  let values = null, dims = [], hasIndices = false;
  for (const f of fields(buf, s, e)) {
    if (f.field === 1 && f.body) values = readTensor(buf, f.body);
    else if (f.field === 2 && f.body) hasIndices = readTensor(buf, f.body).dims.some((d) => d > 0);
    else if (f.field === 3 && f.wire === 0) dims.push(f.value);
    else if (f.field === 3 && f.body) {
      for (let p = f.body[0], v; p < f.body[1];) { [v, p] = readVarint(buf, p); dims.push(v); }
    }
  }
  if (!values) throw new BundleError("a sparse initializer has no values tensor", "rebuild the bundle");
  const count = dims.reduce((a, b) => a * b, 1);
  if (hasIndices || (values.raw && values.raw.length) || values.floats.length) {
    throw new BundleError(`slot ${values.name}'s sparse default holds values; this app reads all-zero ones`);
  }
  if (values.dataType !== 1 && values.dataType !== 3) {
    throw new BundleError(`slot ${values.name} has data type ${values.dataType}; this app handles float32 and int8 slots`);
  }
  const int8 = values.dataType === 3;
  return { name: values.name, dims, type: int8 ? "int8" : "float32",
    data: int8 ? new Int8Array(count) : new Float32Array(count) };
}

/**
 * Turn the named slots of `model` (the verified model.onnx bytes) into plain graph inputs.
 * Returns {model: Uint8Array, defaults: {slot: {dims, data}}}. Throws BundleError when a slot is
 * missing from the graph's initializers or inputs.
 */
export function detachSlots(model, slotNames) {
  const wanted = new Set(slotNames);
  const defaults = {};
  const parts = [];
  let graphSeen = false;
  // The graph may come in several ModelProto.graph fields (the exporter streams large initializers as
  // further fragments); protobuf merges them, so slots and inputs are gathered across all of them.
  const inputs = new Set();
  try {
    for (const f of fields(model)) {
      if (f.field !== 7 || !f.body) {
        parts.push(model.subarray(f.start, f.end));
        continue;
      }
      graphSeen = true;
      const kept = [];
      for (const g of fields(model, ...f.body)) {
        if (g.field === 5 && g.body) {
          const t = readTensor(model, g.body);
          if (wanted.has(t.name)) {
            defaults[t.name] = defaultValue(t);
            continue;
          }
        } else if (g.field === 15 && g.body) {
          const d = sparseDefault(model, g.body);
          if (wanted.has(d.name)) {
            defaults[d.name] = { dims: d.dims, type: d.type, data: d.data };
            continue;
          }
        } else if (g.field === 11 && g.body) {
          for (const v of fields(model, ...g.body)) if (v.field === 1 && v.body) inputs.add(text(model, v.body));
        }
        kept.push(model.subarray(g.start, g.end));
      }
      const length = kept.reduce((a, k) => a + k.length, 0);
      parts.push(writeVarint(7 * 8 + 2), writeVarint(length), ...kept);
    }
    for (const name of wanted) {
      if (!(name in defaults) || !inputs.has(name)) {
        throw new BundleError(`the manifest names adapter slot ${name}, which model.onnx does not hold as an input with a default`,
          "the bundle's model.onnx and manifest do not belong together; rebuild it");
      }
    }
  } catch (err) {
    if (err instanceof BundleError) throw err;
    throw new BundleError(`model.onnx is not a readable ONNX model: ${err.message}`, "rebuild the bundle");
  }
  if (!graphSeen) throw new BundleError("model.onnx holds no graph", "rebuild the bundle");
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return { model: out, defaults };
}
