"""autocast's per-op casts made at the torch-function level, for where ``torch.autocast`` fails.

``torch.autocast`` casts inside the dispatcher, below the ``torch.func`` transforms, and there it
goes wrong: under ``vmap`` an ``nn.Linear`` with a bias (``addmm``, ``baddbmm``, attention)
returns float32 (pytorch issue 192617), and ``vmap(grad(...))`` through a norm fed 16-bit
activations fails (pytorch issue 184890). :class:`AutocastMode` is a ``TorchFunctionMode``: it
sees each torch function before the transforms do, reads the autocast state ``torch.autocast``
set (on or off, and its dtype, for one device type) and, for an op on autocast's lists, casts
the op's floating inputs itself. The casts are ordinary differentiable ops, which ``vmap``
batches, ``grad`` differentiates and Dynamo traces; autocast's own casts then find nothing left
to do. Regions that switch autocast off (``torch.autocast(enabled=False)``,
:func:`polprec.full_precision`, an island with a "true" policy) are left alone.

The lists below are torch's (``aten/src/ATen/autocast_mode.cpp`` and ``autocast_mode.h``, torch
2.13): one for CPU, one shared by CUDA and the other accelerators. Names are op names, which are
also the ``__name__`` of the torch functions, tensor methods and ``torch.nn.functional``
functions that reach a mode. Two additions, because a mode sees Python functions whole:

* ``torch.nn.functional`` composites that run as one call: ``multi_head_attention_forward``
  (its projections, attention and softmax) is a lower-precision op; ``cross_entropy``,
  ``normalize`` and ``interpolate`` follow the float32 ops they are made of.
* Norms (``layer_norm``, ``group_norm``, ``batch_norm``, ``instance_norm``, ``rms_norm``) take
  float32 inputs on every device. On CPU, autocast passes a 16-bit activation to the norm with
  its float32 weight (the kernel computes in float32 and returns 16 bits); that mixed call is
  what ``vmap(grad(...))`` cannot differentiate, so here the norm returns float32.

``scaled_dot_product_attention`` runs with autocast switched off once its inputs are cast, as
autocast's own kernel runs every op it casts (and on CPU so does ``multi_head_attention_forward``,
which calls it). With ``dropout_p > 0`` on CPU SDPA takes its math path, which computes 16-bit
inputs in float32 and calls ``bmm`` inside; under ``torch.func.grad`` (and so in every compiled
polprec step) autocast reaches those inner ``bmm`` calls again, below the transform that saved
their float32 operands, and the backward pass fails with "expected scalar type Float but found
BFloat16". Plain torch does the same (``torch.func.grad`` of a function that runs SDPA with
dropout under ``torch.autocast``); autograd outside the transforms is not affected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from polprec import _tree

__all__ = ["AutocastMode", "rules_for"]

LOWER = "lower_precision_fp"  # floating inputs to the autocast dtype
FP32 = "fp32"  # floating inputs to float32
FP32_UNLESS_DTYPE = "fp32_set_opt_dtype"  # float32, unless the call names an output dtype
PROMOTE = "promote"  # floating inputs to the widest floating dtype among them

_CPU_LOWER = """
    conv1d conv2d conv3d bmm mm linalg_vecdot baddbmm addmm _addmm_activation addbmm linear
    _convolution matmul conv_tbc mkldnn_rnn_layer conv_transpose1d conv_transpose2d
    conv_transpose3d prelu scaled_dot_product_attention _native_multi_head_attention
"""
_CPU_FP32 = """
    avg_pool3d binary_cross_entropy grid_sampler polar prod quantile nanquantile stft cdist
    grid_sampler_2d _grid_sampler_2d_cpu_fallback grid_sampler_3d trace view_as_complex cholesky
    cholesky_inverse cholesky_solve inverse lu_solve orgqr ormqr pinverse max_pool3d max_unpool2d
    max_unpool3d adaptive_avg_pool3d reflection_pad1d reflection_pad2d replication_pad1d
    replication_pad2d replication_pad3d mse_loss cosine_embedding_loss nll_loss nll_loss2d
    hinge_embedding_loss poisson_nll_loss smooth_l1_loss cross_entropy_loss l1_loss huber_loss
    margin_ranking_loss soft_margin_loss triplet_margin_loss multi_margin_loss ctc_loss kl_div
    multilabel_margin_loss binary_cross_entropy_with_logits fft_fft fft_ifft fft_fft2 fft_ifft2
    fft_fftn fft_ifftn fft_rfft fft_irfft fft_rfft2 fft_irfft2 fft_rfftn fft_irfftn fft_hfft
    fft_ihfft linalg_cond linalg_matrix_rank linalg_solve linalg_cholesky linalg_svdvals
    linalg_eigvals linalg_eigvalsh linalg_inv linalg_householder_product linalg_tensorinv
    linalg_tensorsolve fake_quantize_per_tensor_affine geqrf _lu_with_info qr svd
    triangular_solve fractional_max_pool2d fractional_max_pool3d adaptive_max_pool3d
    multilabel_margin_loss_forward linalg_qr linalg_cholesky_ex linalg_svd linalg_eig linalg_eigh
    linalg_lstsq linalg_inv_ex
"""
_CPU_PROMOTE = "stack cat index_copy"

_CUDA_LOWER = """
    _convolution conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d conv_transpose3d
    convolution prelu addmm addmv addr matmul einsum mm mv linalg_vecdot linear addbmm baddbmm bmm
    chain_matmul linalg_multi_dot _thnn_fused_lstm_cell _thnn_fused_gru_cell lstm_cell gru_cell
    rnn_tanh_cell rnn_relu_cell _scaled_dot_product_flash_attention scaled_dot_product_attention
"""
_CUDA_FP32 = """
    acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow softplus
    layer_norm native_layer_norm group_norm frobenius_norm nuclear_norm cosine_similarity
    poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss kl_div l1_loss
    smooth_l1_loss huber_loss mse_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss
    triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits dist pdist cdist renorm
    logsumexp upsample_nearest1d _upsample_nearest_exact1d upsample_nearest2d
    _upsample_nearest_exact2d upsample_nearest3d _upsample_nearest_exact3d upsample_linear1d
    upsample_bilinear2d _upsample_bilinear2d_aa upsample_trilinear3d upsample_bicubic2d
    _upsample_bicubic2d_aa norm
"""
_CUDA_FP32_UNLESS_DTYPE = """
    prod softmax log_softmax cumprod cumsum linalg_vector_norm linalg_matrix_norm sum
"""
_CUDA_PROMOTE = """
    addcdiv addcmul atan2 bilinear cross dot vdot grid_sampler index_put tensordot scatter_add
"""

# Python-level names of the ops above (operators, torch.nn.functional) and the composites.
_ALIASES = {
    "__matmul__": "matmul",
    "__rmatmul__": "matmul",
    "__pow__": "pow",
    "__rpow__": "pow",
    "cross_entropy": "cross_entropy_loss",
    "grid_sample": "grid_sampler",
}
_COMPOSITES = {
    "cpu": {"multi_head_attention_forward": LOWER},
    "other": {
        "multi_head_attention_forward": LOWER,
        "cross_entropy": FP32,  # log_softmax and nll_loss, both float32
        "normalize": FP32,  # norm
        "interpolate": FP32,  # upsample_*
    },
}
_NORMS = ("layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm")
# Ops run with autocast off after their inputs are cast (see the module docstring), per device
# type. On CPU autocast lists no op that nn.MultiheadAttention's forward calls as float32, so
# with its inputs cast it computes as under autocast; on CUDA softmax would differ.
_AUTOCAST_OFF_INSIDE = {
    "cpu": frozenset({"scaled_dot_product_attention", "multi_head_attention_forward"}),
    "other": frozenset({"scaled_dot_product_attention"}),
}


def _table(*lists: tuple[str, str]) -> dict[str, str]:
    table = {name: rule for names, rule in lists for name in names.split()}
    table.update({alias: table[op] for alias, op in _ALIASES.items() if op in table})
    return table


_RULES: dict[str, dict[str, str]] = {
    "cpu": _table((_CPU_LOWER, LOWER), (_CPU_FP32, FP32), (_CPU_PROMOTE, PROMOTE)),
    "other": _table(
        (_CUDA_LOWER, LOWER),
        (_CUDA_FP32, FP32),
        (_CUDA_FP32_UNLESS_DTYPE, FP32_UNLESS_DTYPE),
        (_CUDA_PROMOTE, PROMOTE),
    ),
}
for _kind, _composites in _COMPOSITES.items():
    _RULES[_kind].update(_composites)
    _RULES[_kind].update(dict.fromkeys(_NORMS, FP32))


def rules_for(device_type: str) -> Mapping[str, str]:
    """The cast rule of every op name autocast lists for ``device_type`` (shared: read only)."""
    return _RULES["cpu" if device_type == "cpu" else "other"]


def _eligible(x: Any, device_type: str) -> bool:
    """What autocast casts: floating tensors on its device type, except float64."""
    return (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and x.dtype != torch.float64
        and x.device.type == device_type
    )


def _map_args(
    args: tuple[Any, ...], kwargs: dict[str, Any], fn: Callable[[Any], Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``fn`` over the arguments of a torch function, one sequence level deep (``cat``)."""

    def one(a: Any) -> Any:
        if isinstance(a, list | tuple):
            return type(a)(fn(b) for b in a)
        return fn(a)

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def _floating(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterable[Any]:
    for a in (*args, *kwargs.values()):
        if isinstance(a, list | tuple):
            yield from a
        else:
            yield a


class AutocastMode(TorchFunctionMode):
    """Cast the inputs of autocast's listed ops for ``device_type``, while autocast is on there.

    The compute dtype is autocast's (``torch.get_autocast_dtype``), so nested ``torch.autocast``
    regions and precision islands set it as they do for autocast itself.
    """

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type
        self.rules = rules_for(device_type)
        self.off_inside = _AUTOCAST_OFF_INSIDE["cpu" if device_type == "cpu" else "other"]

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        rule = self.rules.get(name)
        if rule is None or not torch.is_autocast_enabled(self.device_type):
            return func(*args, **kwargs)
        device = self.device_type
        if rule == LOWER:
            dtype = torch.get_autocast_dtype(device)
        elif rule == PROMOTE:
            dtypes = [x.dtype for x in _floating(args, kwargs) if _eligible(x, device)]
            if not dtypes:
                return func(*args, **kwargs)
            dtype = dtypes[0]
            for other in dtypes[1:]:
                dtype = torch.promote_types(dtype, other)
        elif rule == FP32_UNLESS_DTYPE and (
            kwargs.get("dtype") is not None or any(isinstance(a, torch.dtype) for a in args)
        ):
            return func(*args, **kwargs)
        else:
            dtype = torch.float32

        casts = _tree.TensorMemo()  # one cast per tensor: `query is key` still holds after

        def cast(x: Any) -> Any:
            if not _eligible(x, device) or x.dtype == dtype:
                return x
            out = casts.get(x)
            return casts.put(x, x.to(dtype)) if out is None else out

        args, kwargs = _map_args(args, kwargs, cast)
        if name in self.off_inside:
            with torch.autocast(device, enabled=False):
                return func(*args, **kwargs)
        return func(*args, **kwargs)
