"""Deep-image-prior reconstruction (``pet-recon --algorithm dip``; needs the ``train`` extra).

The image is the output of a 3-D U-Net (:mod:`medhpc.ct.unet`, one input and one output
channel) from a fixed input ``z``: seeded Gaussian noise, or an anatomical image given with
``--prior`` (a CT or MR on the image grid, scaled to unit standard deviation)::

    x = s * softplus(f_theta(z)) * support

with ``s`` the mean of one OSEM iteration inside the support, so the network starts at the
right count level. The weights ``theta`` are fitted directly to the data by Adam on the
Poisson negative log-likelihood of one subset per step (as the direct DIP-PET
reconstructions do; no ADMM split). Its gradient with respect to the image,
``G^T A_s^T m - G^T A_s^T (m y / ybar)``, is the OSEM machinery's sensitivity minus its ratio
back projection, summed over the ranks that share the views
(:class:`~medhpc.pet.osem.OsemReconstructor`), so every rank back-propagates the same
image gradient through the same network and keeps identical weights without a weight
all-reduce; 1 and 2 ranks agree to float tolerance.

Early stopping: the network fits the noise too if it runs long enough, so the rule is the
iteration count (``--iterations`` passes over the ``--subsets``), chosen on a phantom at
the count level of the data, as OSEM's iteration count is; the log-likelihood of every step
is logged to show where it flattens.
"""

from __future__ import annotations

import numpy as np

from medhpc import backend
from medhpc.pet.osem import OsemReconstructor, ReconState

OUTPUT_FLOOR = 1e-6


def network_layout(image_shape, widths):
    """Per-stage strides that halve an axis only while it stays at least 4 voxels."""
    from medhpc.ct.planner import NetworkLayout

    strides, sizes = [(1, 1, 1)], list(image_shape)
    for _ in widths[1:]:
        stride = tuple(2 if size >= 8 else 1 for size in sizes)
        sizes = [size // s for size, s in zip(sizes, stride)]
        strides.append(stride)
    kernels = tuple(tuple(3 if n > 1 else 1 for n in image_shape) for _ in widths)
    return NetworkLayout(tuple(widths), tuple(strides), kernels)


class DipReconstructor(OsemReconstructor):
    """OSEM's data model and decomposition with the image produced by a network."""

    def __init__(self, *args, prior: np.ndarray | None = None, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.prior = prior
        self.seed = seed

    def _network_input(self, torch, padded_shape):
        if self.prior is not None:
            prior = np.asarray(self.prior, np.float32)
            prior = (prior - prior.mean()) / max(float(prior.std()), 1e-12)
            padded = np.zeros(padded_shape, np.float32)
            padded[tuple(slice(0, n) for n in prior.shape)] = prior
            return torch.from_numpy(padded)[None, None]
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn((1, 1, *padded_shape), generator=generator)

    def run_iterations(self, state: ReconState, checkpointer=None, progress=None) -> ReconState:
        import torch

        from medhpc.ct.unet import UNet3D, UNetConfig

        settings, run = self.settings, self.run
        torch.set_num_threads(run.threads)
        support = backend.to_host(state.image) > 0
        with run.stage("initial OSEM iteration", "kernel"):
            start = backend.to_device(state.image, self.device)
            for subset in range(settings.n_subsets):
                OsemReconstructor.subiteration(self, start, subset)
            start = backend.to_host(start)
        scale = float(start[support].mean()) if support.any() else 1.0
        layout = network_layout(self.image_shape, settings.dip_widths)
        divisor = layout.divisor
        padded_shape = tuple(n + (-n) % d for n, d in zip(self.image_shape, divisor))
        torch.manual_seed(self.seed)
        network = UNet3D(UNetConfig.from_layout(layout, 1))
        optimizer = torch.optim.Adam(network.parameters(), lr=settings.dip_lr)
        network_input = self._network_input(torch, padded_shape)
        mask = torch.from_numpy(support.astype(np.float32))
        crop = (0, 0) + tuple(slice(0, n) for n in self.image_shape)
        iterations = range(state.iteration, settings.iterations)
        if progress is not None:
            iterations = progress(iterations, desc="DIP iterations")
        for iteration in iterations:
            self.iteration = iteration
            for subset in range(settings.n_subsets):
                with run.stage("network forward", "kernel"):
                    output = network(network_input)[crop]
                    image = scale * torch.nn.functional.softplus(output) * mask + OUTPUT_FLOOR
                with run.stage("transfer", "transfer"):
                    image_device = backend.to_device(image.detach().numpy(), self.device)
                backprojection, likelihood = self.ratio_back_projection(image_device, subset)
                with run.stage("transfer", "transfer"):
                    gradient = (backend.to_host(self.sensitivities[subset])
                                - backend.to_host(backprojection))
                with run.stage("network backward", "kernel"):
                    optimizer.zero_grad(set_to_none=True)
                    image.backward(torch.from_numpy(np.ascontiguousarray(gradient)))
                    optimizer.step()
                state.log_likelihood.append(likelihood)
            state.iteration = iteration + 1
        with torch.no_grad():
            output = network(network_input)[crop]
            state.image = (scale * torch.nn.functional.softplus(output) * mask).numpy()
        return state
