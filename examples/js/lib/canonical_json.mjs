// The bytes an edgepeft manifest signature covers (docs/bundle-format.md, "Signed bytes").
//
// edgepeft signs Python's json.dumps(body, sort_keys=True, separators=(",", ":"),
// ensure_ascii=False, allow_nan=False) encoded as UTF-8. JSON.parse + JSON.stringify does NOT
// reproduce it: JSON.parse forgets whether a number was written "8" or "8.0", JSON.stringify
// writes 8.0 as "8" and 1e-06 as "0.000001", and Array.prototype.sort orders keys by UTF-16
// code unit, Python by code point. So the manifest is parsed here by a strict parser that keeps
// each number's kind (integer or float, as Python's json module decides it) and serialized by
// Python's rules. One parse tree serves both the signature check and the values the app uses.

export class ManifestSyntaxError extends Error {}

// A number as Python's json module reads it: an integer (BigInt, any size) or a float (double).
class Num {
  constructor(text) {
    this.isFloat = /[.eE]/.test(text);
    if (this.isFloat) {
      this.value = Number(text);
      if (!Number.isFinite(this.value)) throw new ManifestSyntaxError(`number ${text} is out of range`);
    } else {
      this.value = BigInt(text);
    }
  }
}

/** Parse JSON text strictly: RFC 8259 grammar, no NaN/Infinity, no duplicate keys. */
export function parseManifestJson(text) {
  let i = 0;
  const fail = (what) => { throw new ManifestSyntaxError(`${what} at offset ${i}`); };
  const ws = () => { while (i < text.length && " \t\n\r".includes(text[i])) i++; };
  const value = () => {
    ws();
    const c = text[i];
    if (c === "{") return object();
    if (c === "[") return array();
    if (c === '"') return string();
    if (text.startsWith("true", i)) { i += 4; return true; }
    if (text.startsWith("false", i)) { i += 5; return false; }
    if (text.startsWith("null", i)) { i += 4; return null; }
    const m = /^-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?/.exec(text.slice(i, i + 400));
    if (!m) fail("expected a JSON value");
    i += m[0].length;
    return new Num(m[0]);
  };
  const object = () => {
    i++;
    const out = new Map();
    ws();
    if (text[i] === "}") { i++; return out; }
    for (;;) {
      ws();
      if (text[i] !== '"') fail("expected a string key");
      const key = string();
      if (out.has(key)) fail(`duplicate key ${JSON.stringify(key)}`);
      ws();
      if (text[i] !== ":") fail("expected ':'");
      i++;
      out.set(key, value());
      ws();
      if (text[i] === ",") { i++; continue; }
      if (text[i] === "}") { i++; return out; }
      fail("expected ',' or '}'");
    }
  };
  const array = () => {
    i++;
    const out = [];
    ws();
    if (text[i] === "]") { i++; return out; }
    for (;;) {
      out.push(value());
      ws();
      if (text[i] === ",") { i++; continue; }
      if (text[i] === "]") { i++; return out; }
      fail("expected ',' or ']'");
    }
  };
  const string = () => {
    const start = i;
    i++;
    for (;;) {
      const c = text[i];
      if (c === undefined) fail("unterminated string");
      if (c === '"') break;
      if (c < " ") fail("raw control character in a string");
      if (c === "\\") {
        const e = text[i + 1];
        if (e === "u") {
          if (!/^[0-9a-fA-F]{4}$/.test(text.slice(i + 2, i + 6))) fail("bad \\u escape");
          i += 6;
        } else if ('"\\/bfnrt'.includes(e)) {
          i += 2;
        } else fail("bad escape");
      } else i++;
    }
    i++;
    const s = JSON.parse(text.slice(start, i)); // a validated string literal: let the engine unescape it
    if (/[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/.test(s)) {
      fail("lone surrogate in a string (not encodable as UTF-8)");
    }
    return s;
  };
  const root = value();
  ws();
  if (i !== text.length) fail("extra data after the JSON value");
  return root;
}

/** The parse tree as ordinary JavaScript values (integers beyond 2^53 stay BigInt). */
export function toPlain(node) {
  if (node instanceof Num) {
    if (node.isFloat) return node.value;
    return Number.isSafeInteger(Number(node.value)) ? Number(node.value) : node.value;
  }
  if (Array.isArray(node)) return node.map(toPlain);
  if (node instanceof Map) return Object.fromEntries([...node].map(([k, v]) => [k, toPlain(v)]));
  return node;
}

// Python's float.__repr__: the shortest digits that round-trip (as JavaScript also finds them),
// fixed notation when the decimal exponent is in [-4, 16), else d.ddde+XX; always a '.0' or an exponent.
export function pythonFloatRepr(x) {
  if (!Number.isFinite(x)) throw new ManifestSyntaxError("NaN and Infinity are not allowed in a manifest");
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const sign = x < 0 ? "-" : "";
  const [mant, exp] = Math.abs(x).toExponential().split("e");
  const digits = mant.replace(".", "");
  const decpt = Number(exp) + 1; // x = 0.DIGITS * 10^decpt
  if (decpt > -4 && decpt <= 16) {
    if (decpt <= 0) return `${sign}0.${"0".repeat(-decpt)}${digits}`;
    if (decpt >= digits.length) return `${sign}${digits}${"0".repeat(decpt - digits.length)}.0`;
    return `${sign}${digits.slice(0, decpt)}.${digits.slice(decpt)}`;
  }
  const e = decpt - 1;
  const m = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
  return `${sign}${m}e${e < 0 ? "-" : "+"}${String(Math.abs(e)).padStart(2, "0")}`;
}

// Python's json string escaping with ensure_ascii=False: only '"', '\\' and C0 controls.
const SHORT = { '"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f" };
function pythonString(s) {
  return '"' + s.replace(/["\\\u0000-\u001f]/g,
    (c) => SHORT[c] ?? "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0")) + '"';
}

// Python sorts str keys by code point; JavaScript's default sort is by UTF-16 code unit.
function byCodePoint(a, b) {
  const x = [...a], y = [...b];
  for (let k = 0; k < Math.min(x.length, y.length); k++) {
    const d = x[k].codePointAt(0) - y[k].codePointAt(0);
    if (d) return d;
  }
  return x.length - y.length;
}

function serialize(node) {
  if (node === null) return "null";
  if (node === true) return "true";
  if (node === false) return "false";
  if (typeof node === "string") return pythonString(node);
  if (node instanceof Num) return node.isFloat ? pythonFloatRepr(node.value) : node.value.toString();
  if (Array.isArray(node)) return "[" + node.map(serialize).join(",") + "]";
  if (node instanceof Map) {
    const keys = [...node.keys()].sort(byCodePoint);
    return "{" + keys.map((k) => pythonString(k) + ":" + serialize(node.get(k))).join(",") + "}";
  }
  throw new TypeError(`cannot serialize ${typeof node}`);
}

/** The signed bytes: the manifest object without its "signature" member, canonical, UTF-8. */
export function canonicalBytes(tree) {
  if (!(tree instanceof Map)) throw new ManifestSyntaxError("the manifest is not a JSON object");
  const body = new Map([...tree].filter(([k]) => k !== "signature"));
  return new TextEncoder().encode(serialize(body));  // a Uint8Array: Node and browsers alike
}
