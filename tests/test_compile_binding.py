"""CONTRACT TESTS of the NKI flash_fwd binding, against recording stand-ins of the Neuron SDK.

Nothing here runs on Inferentia or calls the real kernel: the Neuron SDK is not installable on
this machine. Fake `neuronxcc.nki.kernels.attention` / `torch_neuronx` modules are injected into
sys.modules; their flash_fwd has the documented signature of each SDK generation, applies the
kernel's documented asserts (../shared/seed/flash_fwd.txt, ../shared/docs/flash_fwd-facts.md),
records the launch grid and every bound argument, and computes o with the CPU simulator.
They check what the binding sends: grid [b, kv], argument order, layouts, dtypes, FlashConfig.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fuse_attn.compile import binding, compile_main
from fuse_attn.compile.simulator import simulate_flash_fwd
from fuse_attn.ir.contract import FlashFwdAttrs
from test_compile_lower import fused_model


# The simulator's tensor ops run on one thread: on a shared 2-core machine two are slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclasses.dataclass(frozen=True)
class FlashConfig220:
    seq_tile_size: int = 2048
    training: bool = True
    should_transpose_v: bool = False


@dataclasses.dataclass(frozen=True)
class FlashConfig221(FlashConfig220):
    attn_core_tile_size: int = 256
    lse_dtype: str = ""


class Launchable:
    """kernel[grid](*args, **kwargs): binds the arguments as Python would and records the launch."""

    def __init__(self, func, launches):
        self.func, self.launches = func, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bound = inspect.signature(self.func).bind(*args, **kwargs)  # TypeError exactly as a real call
            self.launches.append(dict(grid=tuple(grid), args=bound.arguments, positional=len(args)))
            return self.func(*args, **kwargs)

        return launch


def _kernel(q, k, v, seed, lse, softmax_scale, use_causal_mask, mixed_precision, dropout_p, config, config_type):
    """The documented asserts of flash_fwd (2.20 source), then the simulated result."""
    assert isinstance(config, config_type)
    b, h, d, n = q.shape
    kh = k.shape[1]
    assert tuple(k.shape) == (b, kh, d, n) and tuple(v.shape) == (b, kh, n, d)  # should_transpose_v=False layout
    assert d <= 128 and config.seq_tile_size >= 512 and n % config.seq_tile_size == 0 and n % 128 == 0
    assert not config.training and lse is None and seed is None and dropout_p == 0.0
    assert q.dtype == k.dtype == v.dtype
    return simulate_flash_fwd(q, k, v, softmax_scale=softmax_scale, use_causal_mask=use_causal_mask,
                              mixed_precision=mixed_precision, seq_tile_size=config.seq_tile_size)


def _sdk_220(launches):
    def flash_fwd(q, k, v, seed, o, lse=None, softmax_scale=None, use_causal_mask=True, mixed_precision=True,
                  dropout_p=0.0, config=None):
        assert tuple(o.shape) == (q.shape[0], q.shape[1], q.shape[3], q.shape[2]) and o.dtype == q.dtype
        o.copy_(_kernel(q, k, v, seed, lse, softmax_scale, use_causal_mask, mixed_precision, dropout_p, config,
                        FlashConfig220))

    attention = types.SimpleNamespace(flash_fwd=flash_fwd, FlashConfig=FlashConfig220)
    ops = types.SimpleNamespace(nki_jit=lambda: (lambda func: Launchable(func, launches)))
    return {"neuronxcc.nki.kernels.attention": attention, "torch_neuronx.xla_impl.ops": ops}


def _sdk_221(launches, logit_bias: bool, jitted: bool = True):
    if logit_bias:  # the later signature
        def flash_fwd(q, k, v, seed, logit_bias=None, softmax_scale=None, use_causal_mask=True, sliding_window=-1,
                      mixed_precision=True, dropout_p=0.0, config=None):
            assert logit_bias is None and sliding_window == -1
            return _kernel(q, k, v, seed, None, softmax_scale, use_causal_mask, mixed_precision, dropout_p, config,
                           FlashConfig221)
    else:
        def flash_fwd(q, k, v, seed, softmax_scale=None, use_causal_mask=True, mixed_precision=True, dropout_p=0.0,
                      config=None):
            return _kernel(q, k, v, seed, None, softmax_scale, use_causal_mask, mixed_precision, dropout_p, config,
                           FlashConfig221)

    nki = types.SimpleNamespace(jit=lambda func: Launchable(func, launches))
    kernel = nki.jit(flash_fwd) if jitted else flash_fwd
    attention = types.SimpleNamespace(flash_fwd=kernel, FlashConfig=FlashConfig221)
    return {"neuronxcc.nki.kernels.attention": attention, "neuronxcc.nki": nki}


def install(monkeypatch, modules):
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


SDKS = {
    "2.20": lambda launches: _sdk_220(launches),
    "2.21": lambda launches: _sdk_221(launches, logit_bias=False),
    "2.22+ logit_bias": lambda launches: _sdk_221(launches, logit_bias=True),
    "2.21 unjitted": lambda launches: _sdk_221(launches, logit_bias=False, jitted=False),
}


def qkv(b, h, kv, d, n, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(b, h, d, n, generator=g).to(dtype), torch.randn(b, kv, d, n, generator=g).to(dtype),
            torch.randn(b, kv, n, d, generator=g).to(dtype))


@pytest.mark.parametrize("sdk", list(SDKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contract_launch(sdk, dtype, monkeypatch):
    launches = []
    install(monkeypatch, SDKS[sdk](launches))
    api = binding.detect_kernel_api()
    assert api.style == (binding.STYLE_2_20 if sdk == "2.20" else binding.STYLE_2_21)
    q, k, v = qkv(2, 8, 2, 64, 1024, dtype)
    attrs = FlashFwdAttrs(softmax_scale=0.125, use_causal_mask=True, num_heads=8, num_kv_heads=2, mixed_precision=True)
    o = binding.launch_flash_fwd(api, q, k, v, attrs, seq_tile_size=512)

    (launch,) = launches
    assert launch["grid"] == (2, 2)  # [b, kv heads], never [b, q heads]
    args = launch["args"]
    assert args["q"] is q and args["k"] is k and args["v"] is v  # kernel layouts, passed as they are
    assert args["seed"] is None
    if sdk == "2.20":
        assert launch["positional"] == 5 and args["o"] is o  # q, k, v, seed, o positionally; o caller-allocated
        assert tuple(o.shape) == (2, 8, 1024, 64) and o.dtype == dtype
    else:
        assert launch["positional"] == 4 and "o" not in args
    assert args["softmax_scale"] == 0.125 and args["use_causal_mask"] is True and args["mixed_precision"] is True
    assert args["dropout_p"] == 0.0
    assert dataclasses.asdict(args["config"]) == dataclasses.asdict(type(args["config"])(seq_tile_size=512, training=False))
    assert o.dtype == dtype and tuple(o.shape) == (2, 8, 1024, 64)
    expected = simulate_flash_fwd(q, k, v, softmax_scale=0.125, seq_tile_size=512)
    assert torch.equal(o, expected)


def test_contract_calling_220_style_on_221_fails_as_reported(monkeypatch):
    """Why the style is detected: the 2.20 call on the 2.21 kernel is nki-samples issue #52."""
    launches = []
    install(monkeypatch, SDKS["2.21"](launches))
    api = binding.detect_kernel_api()
    q, k, v = qkv(1, 2, 2, 16, 512)
    wrong = dataclasses.replace(api, style=binding.STYLE_2_20)
    with pytest.raises(TypeError, match="multiple values for argument 'softmax_scale'"):
        binding.launch_flash_fwd(wrong, q, k, v, FlashFwdAttrs(0.25, True, 2, 2), seq_tile_size=512)


def test_missing_sdk_is_an_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "neuronxcc", None)
    monkeypatch.setitem(sys.modules, "neuronxcc.nki.kernels.attention", None)
    with pytest.raises(ImportError):
        binding.detect_kernel_api()


@pytest.mark.parametrize("sdk", ["2.20", "2.22+ logit_bias"])
def test_contract_compile_end_to_end_with_stand_in_sdk(sdk, monkeypatch, tmp_path, capsys):
    """compile_main with stand-ins for the SDK: the stand-in torch_neuronx.trace records its
    arguments and returns a CPU torch.jit.trace of the lowered module (not a NEFF)."""
    launches, traces = [], []

    def trace(module, example_inputs, compiler_args=None):
        traces.append(dict(example_inputs=example_inputs, compiler_args=compiler_args))
        return torch.jit.trace(module, example_inputs, check_trace=False)

    install(monkeypatch, SDKS[sdk](launches))
    install(monkeypatch, {"torch_neuronx": types.SimpleNamespace(trace=trace), "neuronxcc": types.ModuleType("neuronxcc")})
    model_path, out = tmp_path / "fused.onnx", tmp_path / "model.neuron.pt"
    onnx.save(fused_model(layers=2, heads=4, kv_heads=2), model_path)

    argv = [str(model_path), "--target", "inf2", "--shape", "x=2x300x64", "-o", str(out), "--auto-cast", "matmult",
            "--auto-cast-type", "bf16", "--compiler-arg=--optlevel=2"]
    assert compile_main(argv) == 0
    printed = capsys.readouterr().out
    assert f"SDK call style {binding.STYLE_2_20 if sdk == '2.20' else binding.STYLE_2_21}" in printed
    (traced,) = traces
    assert traced["compiler_args"] == ["--target", "inf2", "--model-type", "transformer", "--auto-cast", "matmult",
                                       "--auto-cast-type", "bf16", "--optlevel=2"]
    assert [tuple(x.shape) for x in traced["example_inputs"]] == [(2, 300, 64)]
    # Two FlashFwd nodes, each launched once on [b, kv] with seq padded 300 -> 512, tile 512.
    assert [launch["grid"] for launch in launches] == [(2, 2), (2, 2)]
    assert all(tuple(launch["args"]["q"].shape) == (2, 4, 16, 512) for launch in launches)
    assert all(tuple(launch["args"]["v"].shape) == (2, 2, 512, 16) for launch in launches)
    assert all(launch["args"]["config"].seq_tile_size == 512 for launch in launches)

    # The saved module (CPU TorchScript here) computes the model: compare with onnxruntime.
    loaded = torch.jit.load(str(out))
    x = np.random.default_rng(3).standard_normal((2, 300, 64)).astype(np.float32)
    expected = ort.InferenceSession(model_path.read_bytes(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with torch.no_grad():
        got = loaded(torch.from_numpy(x)).numpy()
    assert np.abs(got - expected).max() < 3e-2  # mixed precision: bf16 error
