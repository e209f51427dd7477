"""An independent float64 reference for batch norm, written from the equations for clarity."""
import numpy as np


def bn_forward_ref(x, gamma, beta, eps):
    x = np.asarray(x, dtype=np.float64)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    shape = [1] * x.ndim
    shape[1] = x.shape[1]
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    g = np.ones(shape) if gamma is None else np.asarray(gamma, np.float64).reshape(shape)
    b = np.zeros(shape) if beta is None else np.asarray(beta, np.float64).reshape(shape)
    return g * (x - mu) / np.sqrt(var + eps) + b, mu.ravel(), var.ravel()


def random_input(rng, dtype=np.float64, max_ndim=5):
    ndim = int(rng.integers(2, max_ndim + 1))
    shape = [int(rng.integers(2, 9)), int(rng.integers(1, 8))] + [int(rng.integers(1, 6)) for _ in range(ndim - 2)]
    x = rng.normal(loc=rng.uniform(-20, 20), scale=rng.uniform(0.1, 5), size=shape)
    return x.astype(dtype)


def numpy_channels_last(a):
    """NumPy array a's values, stored channels-last: an (N, *spatial, C) C-contiguous array seen as (N, C, *spatial).
    (Equal to a; C-contiguous too where the spatial dimensions are all 1.)"""
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)).transpose(0, a.ndim - 1, *range(1, a.ndim - 1))


def strides_that_matter(t):
    """A torch tensor's strides, leaving out dimensions of size 1 (whose stride means nothing)."""
    return [stride for stride, size in zip(t.stride(), t.shape) if size > 1]


def tensor_layouts(x):
    """(name, tensor): torch tensor x in the layouts a caller may hand a layer: standard, channels-last
    (4D, 5D; dense, and sliced along the channels), a permuted copy (dense, neither standard nor
    channels-last), a slice (not dense) and an expanded batch (stride 0)."""
    import torch
    yield "standard", x
    if x.dim() in (4, 5):
        channels_last = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        yield "channels-last", x.contiguous(memory_format=channels_last)
        wider = torch.cat([x, x], dim=1).contiguous(memory_format=channels_last)
        yield "channels-last, sliced", wider[:, :x.shape[1]]      # not dense, still channels-last to torch
    if x.dim() == 3:                     # (N, C, L) seen through an (N, L, C) tensor, as in transformers
        yield "channels-innermost", x.transpose(1, 2).contiguous().transpose(1, 2)
    yield "permuted", x.transpose(0, -1).contiguous().transpose(0, -1)
    yield "sliced", torch.cat([x, x])[::2]
    yield "expanded", x[:1].expand_as(x)


def check_layouts_like_torch(make_ours, make_theirs, shape, device="cpu", dtype=None, tol=None, seed=0):
    """For every layout of tensor_layouts (of a `dtype` tensor, float64 by default), in training and in
    evaluation: the layer make_ours() gives the y and dx of make_theirs() (torch's), dense in the
    memory format torch suggests for x (bnlib.cuda.suggested_memory_format; dx C-contiguous in evaluation
    on CUDA, as torch's native backward gives it), with torch's strides
    (dimensions of size 1 aside) wherever torch's are dense in a standard format (always on the CPU;
    torch's native CUDA kernels keep a 2-D permuted input's strides); and where torch's y is
    contiguous, ours takes .view() too. dx is the gradient as the layer returns it (autograd.grad):
    a leaf's .grad would have been given the leaf's own strides by autograd, whatever the layer did.

    Values: in float64, ours equal torch's (to `tol`, torch's defaults if None). In a narrower dtype, torch's
    layer is not the reference: its float32 CPU backward loses up to 1.6e-3 of a gradient of size 74 on a
    4-row batch whose variance is 4e-5 (seed 138 of (4, 3)), where ours loses 6e-6. There y and dx must be
    within tol * max(1, max|truth|) of the truth, torch's layer run in float64 on the same values (tol: 1e-5
    for float32 and 1e-2 for float16 and bfloat16 if None). One bound for every element, scaled by the
    largest: BN's errors come from cancellation at the scale of the whole tensor, so a small element may
    be off by as much as a large one.
    x and dy come from a generator seeded with `seed`, never from torch's global one, whose state depends on
    which tests ran before in the same process (pytest-xdist shares the tests out differently each run)."""
    import torch
    from bnlib.cuda import suggested_memory_format
    close = {} if tol is None else {"atol": tol, "rtol": tol}
    dtype = dtype or torch.float64
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, dtype=torch.float64, generator=generator).to(device, dtype)
    dy = torch.randn(shape, dtype=torch.float64, generator=generator).to(base)
    for name, x in tensor_layouts(base):
        fmt = suggested_memory_format(x)
        for training in (True, False):
            ours, theirs = (make().to(device, dtype).train(training) for make in (make_ours, make_theirs))
            xa, xb = x.detach().requires_grad_(), x.detach().requires_grad_()   # views: clone() would make
            #                                                                  a sliced or expanded x dense
            ya, yb = theirs(xa), ours(xb)
            (dxa,), (dxb,) = torch.autograd.grad(ya, xa, dy), torch.autograd.grad(yb, xb, dy)
            if dtype == torch.float64:
                torch.testing.assert_close(yb, ya, **close)
                torch.testing.assert_close(dxb, dxa, **close)
            else:
                truth = make_theirs().to(device, torch.float64).train(training)
                xt = x.detach().double().requires_grad_()
                yt = truth(xt)
                (dxt,) = torch.autograd.grad(yt, xt, dy.double())
                for what, got, want in (("y", yb, yt), ("dx", dxb, dxt)):
                    error = (got.double() - want).abs().max().item()
                    scale = (1e-5 if dtype == torch.float32 else 1e-2) if tol is None else tol
                    bound = scale * max(1.0, want.abs().max().item())
                    assert error <= bound, (name, training, what, error, bound)
            # in evaluation on CUDA, torch's native backward (cuDNN's serves training only) gives dx C-contiguous
            dx_fmt = torch.contiguous_format if (xb.is_cuda and not training) else fmt
            assert yb.is_contiguous(memory_format=fmt) and dxb.is_contiguous(memory_format=dx_fmt), (name, training)
            # torch's strides wherever torch's output is dense in a standard format: always on the CPU; on
            # CUDA, torch's native kernels keep a 2-D permuted input's strides
            for got, want in ((yb, ya), (dxb, dxa)):
                if any(want.is_contiguous(memory_format=f) for f in (torch.contiguous_format, fmt)):
                    assert strides_that_matter(got) == strides_that_matter(want), (name, training)
            if ya.is_contiguous():
                yb.view(shape[0], -1)            # raises for a permuted layout
