"""One dtype resolver for every option, setting and loader of the pack, and one device rule for the library."""

import pytest
import torch

from mod_adapter.modules.dtypes import auto_dtype, optional_dtype, resolve_dtype
from mod_adapter.modules.errors import ModAdapterError


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16), ("fp16", torch.float16),
                                         ("half", torch.float16), ("float32", torch.float32), ("fp32", torch.float32)])
def test_names_users_type(name, dtype):
    assert resolve_dtype(name) is dtype and resolve_dtype(dtype) is dtype


def test_one_auto_rule():
    assert auto_dtype("cuda") is torch.bfloat16 and auto_dtype("cuda:1") is torch.bfloat16
    assert auto_dtype("cpu") is torch.float32 and auto_dtype(None) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16 and resolve_dtype(None, "cpu") is torch.float32
    assert optional_dtype(None) is None and optional_dtype("bf16") is torch.bfloat16


def test_unknown_names_say_what_to_use():
    class LoaderError(ModAdapterError):
        pass

    with pytest.raises(LoaderError, match=r"unknown weights dtype 'fp8'; use one of bf16, .* or auto"):
        resolve_dtype("fp8", what="weights dtype", error_cls=LoaderError)


def test_one_device_rule_for_auto_and_for_a_device_that_is_not_there():
    from mod_adapter.modules.devices import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModAdapterError, match="Unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ModAdapterError, match="no CUDA GPU.*--device cpu"):
            resolve_device("cuda:1")

    class OwnError(Exception):
        pass

    with pytest.raises(OwnError):
        resolve_device("gpu0", error_cls=OwnError)
