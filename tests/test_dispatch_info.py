"""Backend dispatch, the missing-extension fallback, info and the CLI."""
import subprocess
import sys

import pytest
import torch

from moekernels import _extension
from moekernels.ops import dispatch
from moekernels.ops.mog_posterior import SPEC


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve(SPEC, "gpu", {"x": torch.zeros(1, 1)})


def test_environment_reasons_are_readable():
    table = dispatch.available_backends()
    assert set(table) == set(dispatch.BACKENDS)
    assert table["eager"] == []
    if not torch.cuda.is_available():
        assert any("CUDA" in r for r in table["cuda"])
    for reasons in table.values():
        assert all(isinstance(r, str) and r for r in reasons)


def test_dtype_reason_names_the_dtype():
    reasons = dispatch.not_supported_reasons(SPEC, "cpu", {"x": torch.zeros(2, 2, dtype=torch.float16)})
    assert any("float16" in r for r in reasons)


def test_missing_extension_is_a_fallback_not_a_crash(monkeypatch):
    """With the compiled extension gone, auto falls back to eager and the cpu backend explains why."""
    monkeypatch.setattr(_extension, "C", None)
    monkeypatch.setattr(_extension, "load_error", "ImportError: simulated")
    x = torch.zeros(3, 2)
    assert dispatch.resolve(SPEC, "auto", {"x": x}) == "eager"
    with pytest.raises(dispatch.BackendUnavailableError, match="simulated"):
        dispatch.resolve(SPEC, "cpu", {"x": x})


def test_import_without_extension_in_a_subprocess():
    """Importing moekernels with the extension unloadable works and info reports the reason."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'moekernels._C':\n"
        "            raise ImportError('simulated missing build')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, moekernels\n"
        "from moekernels.info import report\n"
        "r = report(); print(r)\n"
        "out = moekernels.mog_posterior(torch.randn(4, 3), torch.randn(2, 3), torch.zeros(2), torch.zeros(2))\n"
        "print('OK', tuple(out.log_resp.shape))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "simulated missing build" in res.stdout
    assert "OK (4, 2)" in res.stdout


def test_info_and_cli_run():
    res = subprocess.run([sys.executable, "-m", "moekernels.info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "backends:" in res.stdout and "eager   available" in res.stdout
    res = subprocess.run([sys.executable, "-m", "moekernels", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "demo" in res.stdout
