// Reading an ONNX Runtime .onnx_adapter file (a FlatBuffer; schema in onnxruntime's
// lora/adapter_format/adapter_schema.fbs, summarised in docs/bundle-format.md, "Adapter files"):
//
//   table Adapter   { format_version:int; adapter_version:int; model_version:int; parameters:[Parameter]; }
//   table Parameter { name:string; dims:[int64]; data_type:TensorDataType(int32); raw_data:[uint8]; }
//
// and expanding compact payloads the way edgepeft's runtime does: fp16 -> fp32, and int8 times its
// "<name>.scale" fp32 tensor (numpy broadcasting). An int8 tensor without a scale is an int8 slot's own
// form (LoRA B in int4/int8 bundles, its scales folded into lora_A) and stays int8. The result is
// tensors named after slots, each {dims, type: "float32" | "int8", data}.

import { BundleError } from "./errors.mjs";

const FLOAT = 1, INT8 = 3, FLOAT16 = 10;
const ITEMSIZE = { [FLOAT]: 4, [INT8]: 1, [FLOAT16]: 2 };
export const SCALE_SUFFIX = ".scale";

class Table {
  constructor(view, pos) {
    this.view = view;
    this.pos = pos;
    this.vt = pos - view.getInt32(pos, true);
    this.vtLen = view.getUint16(this.vt, true);
  }
  field(i) {
    const off = 4 + 2 * i;
    if (off >= this.vtLen) return 0;
    const rel = this.view.getUint16(this.vt + off, true);
    return rel ? this.pos + rel : 0;
  }
  int32(i, dflt = 0) {
    const p = this.field(i);
    return p ? this.view.getInt32(p, true) : dflt;
  }
  vector(i) { // [start of elements, count]
    const p = this.field(i);
    if (!p) return [0, 0];
    const start = p + this.view.getUint32(p, true);
    return [start + 4, this.view.getUint32(start, true)];
  }
  bytes(i) {
    const [start, n] = this.vector(i);
    if (start + n > this.view.byteLength) throw new RangeError("vector runs past the end of the file");
    return new Uint8Array(this.view.buffer, this.view.byteOffset + start, n);
  }
  string(i) { return new TextDecoder("utf-8", { fatal: true }).decode(this.bytes(i)); }
  int64s(i) {
    const [start, n] = this.vector(i);
    return Array.from({ length: n }, (_, k) => Number(this.view.getBigInt64(start + 8 * k, true)));
  }
  tables(i) {
    const [start, n] = this.vector(i);
    return Array.from({ length: n }, (_, k) => {
      const p = start + 4 * k;
      return new Table(this.view, p + this.view.getUint32(p, true));
    });
  }
}

/** {name: {dims, type, data}} of every parameter (data copied into an aligned typed array). */
export function readAdapter(buffer, source) {
  if (new Uint8Array(Uint16Array.of(1).buffer)[0] !== 1) throw new BundleError("this reader assumes a little-endian machine");
  const view = new DataView(buffer.buffer, buffer.byteOffset, buffer.byteLength);
  const out = {};
  try {
    const root = new Table(view, view.getUint32(0, true));
    for (const t of root.tables(3)) {
      const name = t.string(0), dims = t.int64s(1), type = t.int32(2), raw = t.bytes(3);
      if (!ITEMSIZE[type]) {
        const int4 = /\.q4(meta|mask|scale)?$/.test(name);  // the int4 payload's parts (docs/bundle-format.md 6.2)
        throw new BundleError(`${source}: parameter ${name} has unsupported data type ${type}`
          + (int4 ? " (an int4 payload, which this app does not expand)" : ""),
          "export adapters with float32, float16 or int8 tensors (edgepeft build --adapter-dtype int8)");
      }
      const count = dims.reduce((a, b) => a * b, 1);
      if (dims.some((d) => d < 0) || raw.length !== count * ITEMSIZE[type]) {
        throw new BundleError(`${source}: parameter ${name} data does not match its shape [${dims}]`,
          "the file is truncated or corrupted; fetch it again");
      }
      const aligned = new Uint8Array(raw); // a copy at offset 0, so any typed view is aligned
      const data = type === FLOAT ? new Float32Array(aligned.buffer)
        : type === FLOAT16 ? new Uint16Array(aligned.buffer) : new Int8Array(aligned.buffer);
      if (name in out) throw new BundleError(`${source}: parameter ${name} appears twice`, "re-export the adapter");
      out[name] = { dims, type, data };
    }
  } catch (err) {
    if (err instanceof BundleError) throw err;
    throw new BundleError(`${source} is not a readable .onnx_adapter file: ${err.message}`,
      "re-export the adapter, or check that the file was not truncated");
  }
  return out;
}

function halfToFloat(h) {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
  if (e === 0) return s * f * 2 ** -24;
  if (e === 31) return f ? NaN : s * Infinity;
  return s * (1 + f / 1024) * 2 ** (e - 15);
}

// numpy broadcasting of `scale` (dims sdims) against a tensor of dims `dims`: the scale's index for flat index k
function broadcastIndex(dims, sdims, source, name) {
  if (sdims.length > dims.length) throw new BundleError(`${source}: ${name}${SCALE_SUFFIX} has more dims than ${name}`);
  const pad = [...Array(dims.length - sdims.length).fill(1), ...sdims];
  pad.forEach((d, i) => {
    if (d !== 1 && d !== dims[i]) throw new BundleError(`${source}: ${name}${SCALE_SUFFIX} does not broadcast to [${dims}]`);
  });
  const sstride = [];
  let acc = 1;
  for (let i = pad.length - 1; i >= 0; i--) { sstride[i] = pad[i] === 1 ? 0 : acc; acc *= pad[i]; }
  return (k) => {
    let idx = 0;
    for (let i = dims.length - 1; i >= 0; i--) { idx += (k % dims[i]) * sstride[i]; k = Math.floor(k / dims[i]); }
    return idx;
  };
}

/** Compact payloads -> {slot name: {dims, type, data}}, as edgepeft.contracts.adapter_payload does. */
export function expandToSlots(params, source) {
  const out = {};
  for (const [name, p] of Object.entries(params)) {
    if (name.endsWith(SCALE_SUFFIX)) {
      if (!(name.slice(0, -SCALE_SUFFIX.length) in params)) {
        throw new BundleError(`${source}: ${name} scales a tensor the file does not hold`, "re-export the adapter");
      }
      continue;
    }
    if (p.type === FLOAT) {
      out[name] = { dims: p.dims, type: "float32", data: p.data };
    } else if (p.type === FLOAT16) {
      out[name] = { dims: p.dims, type: "float32", data: Float32Array.from(p.data, halfToFloat) };
    } else {
      const scale = params[name + SCALE_SUFFIX];
      if (!scale) {  // an int8 slot's tensor
        out[name] = { dims: p.dims, type: "int8", data: p.data };
        continue;
      }
      if (scale.type !== FLOAT) {
        throw new BundleError(`${source}: ${name}${SCALE_SUFFIX} is not float32`, "re-export the adapter");
      }
      const at = broadcastIndex(p.dims, scale.dims, source, name);
      // Math.fround after the product: numpy multiplies two float32 arrays in float32
      out[name] = { dims: p.dims, type: "float32",
        data: Float32Array.from(p.data, (v, k) => Math.fround(v * scale.data[at(k)])) };
    }
  }
  return out;
}
