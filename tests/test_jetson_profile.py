"""The Jetson Orin profiles (docs/aarch64.md, "Jetson Orin"): ``jetson-orin-cpu`` runs on the CPU today;
``jetson-orin-nano`` puts the CUDA execution provider first, checked here only where onnxruntime offers it
(onnxruntime-gpu with a GPU), skipped with the reason otherwise.
"""

from __future__ import annotations

import onnxruntime
import pytest
from test_export_support import tiny_llama_dir
from test_runtime_support import byte_level_tokenizer

from edgepeft.bundle.build import build_bundle
from edgepeft.contracts.target import load_target
from edgepeft.runtime import Engine

PROMPT = "hello there"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tiny_llama_dir(tmp_path_factory.mktemp("jetson") / "base", vocab_size=300)
    byte_level_tokenizer(d)
    return d


def _bundle(base, tmp_path, keypair, target: str):
    return build_bundle(base=str(base), adapters=[], target=target, key=keypair[0], out=tmp_path / target).bundle_dir


def _tokens(eng: Engine, n: int = 8) -> list[int]:
    return list(eng.generate(PROMPT, max_new_tokens=n, temperature=0).token_ids)


def test_the_cpu_profile_is_an_orin_8gb_board():
    t = load_target("jetson-orin-cpu")
    assert (t.arch, t.device_class, t.providers, t.threads) == ("aarch64", "jetson", ("CPUExecutionProvider",), 6)
    assert t.quant.weights == "int4" and t.budgets.memory_mib < 8192


def test_the_cpu_profile_runs_the_graph_a_pi_runs(base, tmp_path, keypair):
    """Same int4 graph as the raspberry-pi-5 profile's; the engine takes the profile's provider and threads."""
    with Engine(_bundle(base, tmp_path, keypair, "jetson-orin-cpu"), [keypair[1]]) as orin, \
            Engine(_bundle(base, tmp_path, keypair, "raspberry-pi-5"), [keypair[1]]) as pi:
        assert orin.session.get_providers() == ["CPUExecutionProvider"] and orin.threads == 6
        assert _tokens(orin) == _tokens(pi)


def test_the_cuda_profile_runs_on_the_gpu_where_there_is_one(base, tmp_path, keypair):
    """Where onnxruntime offers CUDAExecutionProvider, the jetson-orin-nano bundle must open with it first and
    decode as the CPU does; elsewhere this says why it was not checked."""
    have = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in have:
        pytest.skip(f"no GPU to check the CUDA profile on: onnxruntime {onnxruntime.__version__} here offers "
                    f"{have} (install onnxruntime-gpu on a machine with an NVIDIA GPU, or run on a Jetson)")
    bundle = _bundle(base, tmp_path, keypair, "jetson-orin-nano")
    with Engine(bundle, [keypair[1]]) as gpu, Engine(bundle, [keypair[1]], providers=["CPUExecutionProvider"]) as cpu:
        assert gpu.session.get_providers()[0] == "CUDAExecutionProvider"
        got, want = _tokens(gpu), _tokens(cpu)
        assert len(got) == len(want) and got[0] == want[0]  # int4 kernels differ: later near-ties may part
