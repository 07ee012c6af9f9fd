"""Target profiles: every shipped profile validates; malformed files name the file, field and problem."""

from __future__ import annotations

import json
import tomllib

import pytest

from edgepeft.contracts.target import TargetProfile, list_targets, load_target, targets_dir
from edgepeft.errors import SpecError

REQUIRED_CLASSES = {"raspberry-pi-5": "sbc", "jetson-orin-nano": "jetson", "jetson-orin-cpu": "jetson", "android-arm64": "phone",
                    "x86-64-gateway": "gateway", "serial-gateway": "serial-gateway"}


@pytest.mark.parametrize("name", sorted(REQUIRED_CLASSES))
def test_shipped_profile_is_valid(name):
    t = load_target(name)
    assert t.name == name and t.device_class == REQUIRED_CLASSES[name]
    assert t.providers[-1] == "CPUExecutionProvider"
    assert t.budgets.memory_mib > 0 and t.budgets.storage_mib > 0 and t.budgets.max_adapter_rank > 0
    assert TargetProfile.from_dict(tomllib.loads(t.to_toml()), "roundtrip.toml") == t
    assert TargetProfile.from_dict(json.loads(t.to_json()), "roundtrip.json") == t


def test_specific_profile_facts():
    assert load_target("jetson-orin-nano").providers[0] == "CUDAExecutionProvider"
    assert load_target("android-arm64").providers[0] == "XnnpackExecutionProvider"
    assert load_target("android-arm64").quant.weights == "int4"
    assert load_target("x86-64-gateway").quant.weights == "int8"
    serial = load_target("serial-gateway")
    assert serial.update.link == "serial" and serial.update.baud == 921600
    assert set(list_targets()) >= set(REQUIRED_CLASSES)


def _profile(**changes) -> str:
    text = (targets_dir() / "raspberry-pi-5.toml").read_text()
    data = tomllib.loads(text)
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        table = data
        for p in parents:
            table = table.setdefault(p, {})
        if value is None:
            table.pop(key)
        else:
            table[key] = value
    from edgepeft.contracts import tomlfile as _toml

    return _toml.dumps(data)


@pytest.mark.parametrize("changes, field, problem", [
    ({"name": None}, "name", "required"),
    ({"threads": "four"}, "threads", "integer"),
    ({"threads": 0}, "threads", "at least 1"),
    ({"device_class": "toaster"}, "device_class", "not one of"),
    ({"providers": ["CUDAExecutionProvider"]}, "providers", "must end with CPUExecutionProvider"),
    ({"providers": ["FooExecutionProvider", "CPUExecutionProvider"]}, "providers[0]", "unknown ONNX Runtime"),
    ({"quantization.weights": "int3"}, "quantization.weights", "not one of"),
    ({"quantization.block_size": 48}, "quantization.block_size", "power of two"),
    ({"budgets.memory_mib": None}, "budgets.memory_mib", "required"),
    ({"budgets.max_adapter_rank": -4}, "budgets.max_adapter_rank", "at least 1"),
    ({"update.link": "serial"}, "update.baud", "required"),
    ({"update.link": "serial", "update.baud": 12345}, "update.baud", "standard UART"),
    ({"update.baud": 115200}, "update.baud", "only applies"),
    ({"treads": 4}, "treads", "not a known field"),
    ({"schema_version": 99}, "schema_version", "newer"),
])
def test_malformed_profile_names_file_field_and_problem(tmp_path, changes, field, problem):
    path = tmp_path / "bad.toml"
    path.write_text(_profile(**changes))
    with pytest.raises(SpecError) as info:
        load_target(path)
    err = info.value
    assert err.source == str(path) and err.field == field and problem in err.problem
    assert str(path) in str(err) and field in str(err)


def test_invalid_toml_and_unknown_name(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("name = \n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_target(path)
    with pytest.raises(SpecError, match="not a known target") as info:
        load_target("no-such-device")
    assert "raspberry-pi-5" in info.value.hint
    with pytest.raises(SpecError, match="cannot be read"):
        load_target(tmp_path / "missing.toml")


def test_json_profile(tmp_path):
    path = tmp_path / "pi.json"
    path.write_text(load_target("raspberry-pi-5").to_json())
    assert load_target(path).name == "raspberry-pi-5"


def test_one_choice_check_names_the_value_the_choices_and_the_option():
    from edgepeft.contracts.fields import check_choice
    from edgepeft.errors import TrainError, UsageError

    assert check_choice("b", ("a", "b"), "mode") == "b"
    with pytest.raises(UsageError) as info:
        check_choice("c", ("a", "b"), "mode", hint_flag="--mode")
    assert info.value.message == "unknown mode 'c': not one of a, b" and "--mode" in info.value.hint
    with pytest.raises(TrainError):
        check_choice(3, (1, 2), "size", error=TrainError)
    # a peer's value: True is not the choice 1, and a long value is cut in the message
    with pytest.raises(UsageError):
        check_choice(True, (1, 2), "size")
    with pytest.raises(UsageError) as info:
        check_choice("x" * 10_000, ("a",), "mode")
    assert len(info.value.message) < 150


def test_lora_b_auto_is_int8_only_where_no_batch_can_form():
    """fp32 LoRA B exists for batching: the phone profile serves one request at a time, so its quantized
    builds get int8 B (a quarter of B's bytes per adapter); an explicit choice is kept."""
    from edgepeft.contracts.target import resolve_lora_b

    phone, gateway = load_target("android-arm64"), load_target("x86-64-gateway")
    assert phone.budgets.max_concurrent == 1 and gateway.budgets.max_concurrent > 1
    assert resolve_lora_b("auto", phone, "int4") == "int8"
    assert resolve_lora_b("auto", phone, "fp32") == "fp32"  # unquantized builds never had int8 B by default
    assert resolve_lora_b("auto", gateway, "int4") == "fp32"
    assert resolve_lora_b("fp32", phone, "int4") == "fp32" and resolve_lora_b("int8", gateway, "int8") == "int8"
