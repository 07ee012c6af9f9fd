"""A small ONNX graph builder over ``onnx.helper``: nodes, initializers, slots, atomic save.

The exporters build graphs node by node from a Hugging Face state dict (the way
onnxruntime-genai's model builder does) instead of tracing torch: that gives
full control over fused contrib ops, quantized weights and adapter slots.
``onnx`` is imported lazily so ``import edgepeft.export`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fsio import write_atomic

MS_DOMAIN = "com.microsoft"
OPSET = 17  # LayerNormalization needs 17; ORT 1.20+ runs it everywhere.


class GraphBuilder:
    """Collects nodes, initializers, inputs and outputs, then makes one ModelProto."""

    def __init__(self, name: str):
        from onnx import helper

        self._helper = helper
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
        self.initializers.append(numpy_helper.from_array(arr, name))
        self._names.add(name)
        return name

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(self._helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> str:
        self.outputs.append(self._helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def slot(self, name: str, default: np.ndarray, shape: list, described: list) -> str:
        """An overridable initializer: a graph input backed by a default value.

        ``shape`` is the graph-level shape (symbolic dims allowed, so adapters of
        the bundle's rank can replace an empty default); ``described`` is what
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
        graph = self._helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers,
                                        sparse_initializer=self.sparse_initializers)
        model = self._helper.make_model(
            graph,
            opset_imports=[self._helper.make_opsetid("", OPSET), self._helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="edgepeft",
            doc_string=doc,
        )
        model.ir_version = 10  # ORT >= 1.20 reads IR 10; initializers may be inputs (IR >= 4)
        return model


def save_model(model, path: str | Path) -> int:
    """Serialize ``model`` into ``path`` atomically (:func:`edgepeft.fsio.write_atomic`); returns its size.

    Models stay under protobuf's 2 GiB limit for the bases edgepeft targets;
    larger ones raise :class:`edgepeft.errors.BuildError`.
    """
    from ..errors import BuildError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbytes = model.ByteSize()
    if nbytes >= 2**31 - 1:
        raise BuildError(f"the exported graph is {nbytes / 2**30:.1f} GiB, over ONNX's 2 GiB single-file limit",
                         hint="use int4 or int8 quantization, or a smaller base model")
    write_atomic(path, model.SerializeToString())
    return path.stat().st_size
