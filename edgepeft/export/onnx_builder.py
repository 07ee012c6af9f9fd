"""A small ONNX graph builder over ``onnx.helper``: nodes, initializers, slots, atomic save.

The exporters build graphs node by node from a Hugging Face state dict (the way
onnxruntime-genai's model builder does) instead of tracing torch: that gives
full control over fused contrib ops, quantized weights and adapter slots.
``onnx`` is imported lazily so ``import edgepeft.export`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fsio import FileIO, atomic_path, write_atomic

MS_DOMAIN = "com.microsoft"
OPSET = 17  # LayerNormalization needs 17; ORT 1.20+ runs it everywhere.


SPOOL_MIN = 4096  # initializers of at least this many bytes go to the spool file when there is one


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs, then makes one ModelProto.

    With ``spool`` (a file path), initializers of :data:`SPOOL_MIN` bytes or more are written to
    that file as they are made and kept in the graph as external references (no bytes in memory):
    a model's quantized weights never have to be in memory all at once. :func:`save_model` then
    streams them into model.onnx.
    """

    def __init__(self, name: str, spool: str | Path | None = None):
        from onnx import helper

        self._helper = helper
        self.spool = None if spool is None else Path(spool)
        self._spool_fh = None
        self._spool_at = 0
        self.name = name
        self.nodes: list = []
        self.initializers: list = []
        self.sparse_initializers: list = []  # all-zero slot defaults: a shape, no bytes
        self.inputs: list = []
        self.outputs: list = []
        self._names: set[str] = set()
        self._count = 0
        self.slots: dict[str, list] = {}
        self.slot_dtypes: dict[str, str] = {}  # slots that are not float32: name -> numpy dtype name
        self.metadata: dict[str, str] = {}  # the model's metadata_props (what the runtime reads of the graph)

    # -- naming -------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        """A tensor name not used yet, derived from ``hint``."""
        self._count += 1
        name = f"{hint}_{self._count}"
        self._names.add(name)
        return name

    # -- tensors ------------------------------------------------------------
    def const(self, array, name: str | None = None) -> str:
        """Add ``array`` as an initializer and return its name."""
        from onnx import numpy_helper

        arr = np.asarray(array)
        name = name or self.fresh("const")
        if not arr.flags.c_contiguous:  # (np.ascontiguousarray would turn a scalar into shape [1])
            arr = arr.copy(order="C")
        if self.spool is not None and arr.nbytes >= SPOOL_MIN:
            self.initializers.append(self._spooled(arr, name))
        else:
            self.initializers.append(numpy_helper.from_array(arr, name))
        self._names.add(name)
        return name

    def _spooled(self, arr: np.ndarray, name: str):
        """``arr``'s bytes appended to the spool file; a TensorProto pointing at them."""
        from onnx import TensorProto, helper

        if self._spool_fh is None:
            self.spool.parent.mkdir(parents=True, exist_ok=True)
            self._spool_fh = open(self.spool, "wb")  # noqa: SIM115 (closed by close_spool)
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=list(arr.shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.spool.name), ("offset", str(self._spool_at)), ("length", str(len(data)))):
            t.external_data.add(key=k, value=v)
        self._spool_fh.write(data)
        self._spool_at += len(data)
        return t

    def close_spool(self) -> None:
        """Flush the spool file (the graph's external references are then readable)."""
        if self._spool_fh is not None:
            self._spool_fh.close()
            self._spool_fh = None

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(self._helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> str:
        self.outputs.append(self._helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def slot(self, name: str, default: np.ndarray, shape: list, described: list) -> str:
        """An overridable initializer: a graph input backed by a default value.

        ``shape`` is the graph-level shape (symbolic dims allowed, so adapters of
        the bundle's rank can replace an empty default; None declares no shape, so a
        tensor of any rank may be bound, see :mod:`.slots`); ``described`` is what
        goes into manifest["model"]["slots"]. The slot takes ``default``'s dtype when it
        is int8 (quantized LoRA B slots), float32 otherwise.
        """
        from onnx import TensorProto, numpy_helper

        default = default if default.dtype == np.int8 else default.astype(np.float32)
        if default.dtype == np.int8:
            self.slot_dtypes[name] = "int8"
        elem = TensorProto.INT8 if default.dtype == np.int8 else TensorProto.FLOAT
        if default.size and not default.any():  # zeros of a shape: a sparse initializer with no values
            values = numpy_helper.from_array(np.zeros(0, default.dtype), name)
            indices = numpy_helper.from_array(np.zeros(0, np.int64), name + ".indices")
            self.sparse_initializers.append(self._helper.make_sparse_tensor(values, indices, list(default.shape)))
            self._names.add(name)
        else:
            self.const(default, name)
        self.inputs.append(self._helper.make_tensor_value_info(name, elem, shape))
        self.slots[name] = described
        return name

    def shared(self, name: str, array) -> str:
        """An initializer many nodes use, added once under ``name``."""
        if name not in self._names:
            self.const(array, name)
        return name

    # -- nodes --------------------------------------------------------------
    def op(self, op_type: str, inputs: list, *, outputs: int | list = 1, domain: str = "",
           hint: str | None = None, **attrs):
        """Append a node; returns its output name, or a list when ``outputs`` > 1 or a list."""
        hint = hint or op_type.lower()
        if isinstance(outputs, int):
            names = [self.fresh(hint) for _ in range(outputs)]
            single = outputs == 1
        else:
            names = [n if n is not None else self.fresh(hint) for n in outputs]
            single = False
        self.nodes.append(self._helper.make_node(op_type, list(inputs), names, name=self.fresh(f"n_{hint}"),
                                                 domain=domain or None, **attrs))
        return names[0] if single else names

    def alias(self, source: str, name: str, node_name: str) -> str:
        """An Identity node giving tensor ``source`` the fixed name ``name`` (graph outputs, and points
        that later code finds by name); its node is called ``node_name``. Returns ``name``."""
        self.nodes.append(self._helper.make_node("Identity", [source], [name], name=node_name))
        return name

    def ms(self, op_type: str, inputs: list, **kw):
        """A com.microsoft contrib op."""
        return self.op(op_type, inputs, domain=MS_DOMAIN, **kw)

    # -- model --------------------------------------------------------------
    def model(self, doc: str = ""):
        self.close_spool()
        graph = self._helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers,
                                        sparse_initializer=self.sparse_initializers)
        model = self._helper.make_model(
            graph,
            opset_imports=[self._helper.make_opsetid("", OPSET), self._helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="edgepeft",
            doc_string=doc,
        )
        model.ir_version = 10  # ORT >= 1.20 reads IR 10; initializers may be inputs (IR >= 4)
        if self.metadata:
            self._helper.set_model_props(model, self.metadata)
        return model


_MAX_PROTO = 2**31 - 1  # protobuf's limit on one serialized message


def save_model(model, path: str | Path, spool: str | Path | None = None) -> int:
    """Serialize ``model`` into ``path`` atomically (tmp file + os.replace); returns its size.

    Initializers held as external references to ``spool`` (see :class:`GraphBuilder`) are
    streamed in one at a time: the graph without them is written first, then each tensor as
    another occurrence of ModelProto's ``graph`` field, which protobuf parsers merge (repeated
    ``initializer`` entries concatenate). The file is an ordinary single-file model, written
    without holding all weights in memory. A model over protobuf's 2 GiB limit is written with
    ONNX external data instead (``path`` + ``path.data``, the spool renamed) when it has a spool;
    without one it raises :class:`edgepeft.errors.BuildError`.
    """
    from onnx import GraphProto, TensorProto

    from ..errors import BuildError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = model.graph
    external = [t for t in graph.initializer if t.data_location == TensorProto.EXTERNAL] if spool else []
    if external:
        inline = [t for t in graph.initializer if t.data_location != TensorProto.EXTERNAL]
        del graph.initializer[:]
        graph.initializer.extend(inline)
    ext_bytes = sum(int(_ext(t)["length"]) + len(t.name) + 64 for t in external)
    nbytes = model.ByteSize() + ext_bytes
    if nbytes >= _MAX_PROTO and external:  # over protobuf's limit: the spool becomes model.onnx's data file
        graph.initializer.extend(external)
        return _save_external(model, path, Path(spool))
    if nbytes >= _MAX_PROTO:
        raise BuildError(f"the exported graph is {nbytes / 2**30:.1f} GiB, over ONNX's 2 GiB single-file limit",
                         hint="use int4 or int8 quantization, or a smaller base model")
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # fsynced, renamed, folder fsynced
            fh.write(model.SerializeToString())
            if external:
                with open(spool, "rb") as src:
                    for t in external:
                        ext = _ext(t)
                        src.seek(int(ext["offset"]))
                        frag = GraphProto()
                        frag.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims,
                                             raw_data=src.read(int(ext["length"])))
                        body = frag.SerializeToString()
                        fh.write(_GRAPH_TAG + _varint(len(body)) + body)
                        del frag, body
    finally:
        if external:
            graph.initializer.extend(external)
    return path.stat().st_size


def _save_external(model, path: Path, spool: Path) -> int:
    """``model`` as ``path`` plus ``path.data`` (ONNX external data: the spool file renamed); returns both
    files' size together."""
    from onnx import TensorProto

    data = path.with_name(path.name + ".data")
    for t in model.graph.initializer:  # (the graph holds copies of ``external``'s entries)
        if t.data_location != TensorProto.EXTERNAL:
            continue
        for e in t.external_data:
            if e.key == "location":
                e.value = data.name
    FileIO().fsync_file(spool)
    FileIO().replace(spool, data)
    write_atomic(path, model.SerializeToString())
    return path.stat().st_size + data.stat().st_size


_GRAPH_TAG = bytes([(7 << 3) | 2])  # ModelProto field 7 (graph), length-delimited


def _ext(t) -> dict:
    return {e.key: e.value for e in t.external_data}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)
