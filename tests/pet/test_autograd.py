"""The projector as a PyTorch operator: gradients are the exact adjoint (gradcheck)."""

import numpy as np
import pytest

from medhpc.pet.projector import JosephProjector, TofSpec
from tests.pet.test_projector import ORIGIN_MM, SHAPE, VOXEL_MM, lors_through

torch = pytest.importorskip("torch")

from medhpc.pet.autograd import project  # noqa: E402

TOF = TofSpec(bins=5, bin_mm=6.0, sigma_mm=4.0)


def tiny_projector(tof=None, n=12, seed=0):
    rng = np.random.default_rng(seed)
    low = ORIGIN_MM - 0.5 * VOXEL_MM
    high = low + np.array(SHAPE[::-1]) * VOXEL_MM
    points = low + rng.random((n, 3)) * (high - low)
    xstart, xend = lors_through(points, rng, reach_mm=30.0)
    return JosephProjector(xstart, xend, SHAPE, ORIGIN_MM, VOXEL_MM, tof=tof)


@pytest.mark.parametrize("tof", [None, TOF], ids=["nontof", "tof"])
def test_forward_is_the_projector_and_backward_its_adjoint(tof):
    projector = tiny_projector(tof)
    rng = np.random.default_rng(1)
    image = torch.tensor(rng.random(SHAPE, dtype=np.float32), requires_grad=True)
    weights = torch.tensor(rng.random(projector.shape_out, dtype=np.float32))
    projection = project(image, projector)
    np.testing.assert_allclose(projection.detach().numpy(), projector.forward(image.detach()
                                                                              .numpy()))
    (projection * weights).sum().backward()
    np.testing.assert_allclose(image.grad.numpy(), projector.back(weights.numpy()), rtol=1e-6)


@pytest.mark.parametrize("tof", [None, TOF], ids=["nontof", "tof"])
def test_gradcheck_in_double_precision(tof):
    projector = tiny_projector(tof, n=6, seed=2)
    image = torch.rand(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3),
                       requires_grad=True)
    # the kernels compute in float32: finite differences of 1e-2 keep their rounding small
    assert torch.autograd.gradcheck(lambda x: project(x, projector), (image,), eps=1e-2,
                                    atol=1e-4, rtol=1e-3)


def test_a_batch_and_subsets_give_the_summed_poisson_gradient():
    """Two subsets' projectors, a batch of two images: the gradient of the Poisson
    log-likelihood is the EM form A^T (y / (A x + a) - 1), summed over the subsets."""
    subsets = [tiny_projector(seed=4), tiny_projector(seed=5)]
    rng = np.random.default_rng(6)
    images = torch.tensor(rng.random((2, *SHAPE), dtype=np.float32) + 0.5, requires_grad=True)
    counts = [torch.tensor(rng.poisson(5.0, p.shape_out).astype(np.float32)) for p in subsets]
    additive = 0.1
    loss = 0.0
    for projector, y in zip(subsets, counts):
        expected = project(images, projector) + additive
        loss = loss + (y * torch.log(expected) - expected).sum()
    loss.backward()
    for b in range(2):
        analytic = sum(p.back(y.numpy() / (p.forward(images[b].detach().numpy()) + additive)
                              - 1.0) for p, y in zip(subsets, counts))
        np.testing.assert_allclose(images.grad[b].numpy(), analytic, rtol=1e-4, atol=1e-4)


def test_a_tensor_on_another_device_than_the_projector_is_refused():
    projector = tiny_projector()
    projector.device = "cuda"
    with pytest.raises(ValueError, match="same device"):
        project(torch.zeros(SHAPE), projector)
