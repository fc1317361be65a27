"""The Joseph projector as a differentiable PyTorch operator (needs the ``train`` extra).

``project(image, projector)`` is ``A x`` for a :class:`~medhpc.pet.projector.JosephProjector`
(non-TOF or TOF, one subset's LORs or all of them); its backward pass is the projector's
exact adjoint ``A^T``, so a loss on the projection (a Poisson log-likelihood, say) gives the
gradient with respect to the image, or to the weights of a network that produced it.

CPU tensors run the CPU kernels on a NumPy view of the tensor's memory; CUDA tensors run the
CUDA kernels on the tensor's own device memory (``__cuda_array_interface__``: no copy), and
the results are tensors on the same device. The kernels compute in float32: other floating
dtypes are cast on the way in and the results cast back, so double-precision callers (such
as ``torch.autograd.gradcheck``) see their own dtype. Leading dimensions before the image's
``(nz, ny, nx)`` are a batch, projected one image at a time.
"""

from __future__ import annotations

import torch


class JosephProjection(torch.autograd.Function):
    """``y = A x`` with ``dL/dx = A^T dL/dy``; see :func:`project`."""

    @staticmethod
    def forward(ctx, image, projector):
        if image.is_cuda != (projector.device == "cuda"):
            raise ValueError(f"a {image.device.type} tensor given to a projector on "
                             f"{projector.device}; expected both on the same device")
        ctx.projector = projector
        return _apply(image, projector.image_shape, projector.shape_out, projector.forward)

    @staticmethod
    def backward(ctx, grad_projection):
        projector = ctx.projector
        grad_image = _apply(grad_projection, projector.shape_out, projector.image_shape,
                            projector.back)
        return grad_image, None


def project(image: torch.Tensor, projector) -> torch.Tensor:
    """Forward-project ``image`` (``..., nz, ny, nx``) with ``projector``, differentiably.

    Returns a tensor of shape ``(..., *projector.shape_out)`` on the image's device, in its
    dtype.
    """
    return JosephProjection.apply(image, projector)


def _apply(tensor: torch.Tensor, shape_in, shape_out, operator) -> torch.Tensor:
    shape_in, shape_out = tuple(shape_in), tuple(shape_out)
    if tuple(tensor.shape[tensor.dim() - len(shape_in):]) != shape_in:
        raise ValueError(f"expected a tensor ending in {shape_in}, got {tuple(tensor.shape)}")
    batch = tuple(tensor.shape[:tensor.dim() - len(shape_in)])
    flat = tensor.detach().to(torch.float32).contiguous().reshape(-1, *shape_in)
    results = [_run(operator, item) for item in flat]
    out = (torch.stack(results) if results else
           torch.empty((0, *shape_out), dtype=torch.float32, device=tensor.device))
    return out.reshape(*batch, *shape_out).to(tensor.dtype)


def _run(operator, item: torch.Tensor) -> torch.Tensor:
    if item.is_cuda:
        from numba import cuda

        with torch.cuda.device(item.device):
            result = operator(cuda.as_cuda_array(item))
            return torch.as_tensor(result, device=item.device)
    return torch.from_numpy(operator(item.numpy()))
