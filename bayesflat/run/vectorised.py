"""Several chains of one model as one batched computation.

The ``vectorised`` executor advances ``K`` chains in lockstep in one process. Their weights are
stacked into tensors with a leading chain dimension ``(K, *shape)``; one batched forward and
backward pass over the ``K`` minibatches (``(K, |B|, ...)``) gives every chain its own
gradient, and the sampler's update runs once on the stacked tensors. Each chain keeps its own
generators, so the draws are those of the sequential run to float tolerance (the batched matrix
products round differently from one chain's):

* minibatches come from each chain's :class:`~bayesflat.run.stream.MinibatchStream`;
* the Langevin noise and the perturbations are drawn row by row from each chain's generator
  into a workspace with a chain dimension (:class:`StackedBuffer`), in the order the
  sequential sampler draws them;
* the potential of chain ``k`` is its own ``L_B`` (mean-loss units); the closure returns the
  vector of the ``K`` potentials, and ``backward`` of their sum leaves each chain's gradient in
  its row, since the chains share no weights.

What a chain records, checkpoints and reports goes through the same per-chain objects as the
sequential executor (a module, a sampler holding the chain's generator, a stream, a recorder):
at each kept draw the chain's row is copied into them. A checkpoint of a vectorised chain is
therefore a checkpoint of a sequential one and may be resumed by any executor. What a kept
draw evaluates is computed for all chains at once and handed to each chain's recorder: the
outputs on the evaluation sets and on the ``log_likelihood`` training points (one batched
forward per ``eval_batch_size`` examples, so ``K`` times the memory of one chain's), the
weight norms and the random projections (one matrix product).

For networks made of ``Linear`` layers, ``Flatten`` and element-wise activations (such as
:class:`bayesflat.models.MLP`) the forward pass is a stack of batched matrix products
(``baddbmm``) and the backward pass is written out: for a layer ``z = W h + b`` with upstream
gradient ``g = dL/dz`` (all ``(K, ., |B|)``), ``dL/dW = g h^T``, ``dL/db = sum_B g`` and
``dL/dh = W^T g``, each one batched product written into the chain-stacked gradient; ReLU
masks ``g`` with the sign of its output, other activations go through autograd, and the
categorical likelihood's gradient is ``(softmax(f) - onehot(y)) / |B|``. Other networks run
through ``torch.func.vmap`` over ``functional_call`` and autograd.

Cost: the ``K`` chains do ``K`` times one chain's arithmetic; what batching removes is the
per-operation overhead. On the digits MLP (fSGLD, one thread) the Langevin and perturbation
noise, drawn row by row from each chain's generator, costs ``K`` times one chain's draws and
is the largest single part; see ``benchmarks/run_engine.py``.

Samplers whose update is element-wise are vectorised: a plain or perturbed gradient (Gaussian
or Rademacher, several draws, antithetic pairs, clean-weight mixing) followed by Langevin
dynamics (sgld, sgd, fsgld, rwp, nso ...). Those whose state or norms couple the weights of a
chain (SAM's gradient norm, filter-normalised perturbations, preconditioners, momenta,
trajectory averages) are refused with a message pointing to ``executor="processes"``; so are
networks with BatchNorm running statistics, active dropout or frozen parameters.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn

from bayesflat.run.chain import (
    _FLUSH_BYTES,
    ChainFailure,
    Computed,
    _loo_data,
    _Recorder,
    _rng_devices,
    projection_directions,
    reads_potential,
)
from bayesflat.run.checkpoint import ChainState, snapshot
from bayesflat.run.spec import RunSpec, chain_seeds, make_sampler
from bayesflat.run.stream import MinibatchStream
from bayesflat.samplers.base import (
    FlatBuffer,
    PlainGradient,
    Sampler,
    fill_normal_,
    fill_rademacher_,
)
from bayesflat.samplers.langevin import LangevinDynamics
from bayesflat.samplers.perturbation import PerturbedGradient
from bayesflat.target.torch import CategoricalLikelihood, FlatPrior, GaussianPrior

__all__ = ["StackedBuffer", "check_vectorisable", "run_vectorised"]

_FALLBACK = "run these chains with executor='processes' (workers=K) or 'sequential'"

_ELEMENTWISE = (
    nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Softplus,
    nn.Identity, nn.Mish, nn.Hardtanh,
)  # fmt: skip


class ChainGenerators(list):
    """The generators of the chains of a vectorised sampler, one per row."""


class StackedBuffer(FlatBuffer):
    """A :class:`FlatBuffer` with a leading chain dimension.

    Parameters are stacked tensors ``(K, *shape)``; a chunk is ``(K, P)`` with ``P`` the
    number of weights of one chain. Row ``k`` is laid out exactly like one chain's flat
    buffer, and :meth:`normal_` / :meth:`rademacher_` fill it from chain ``k``'s generator,
    so every chain sees the random numbers its sequential run draws.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.views = {}
        self.chunks = []
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in self.params:
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        for (device, dtype), plist in by_kind.items():
            chains = plist[0].shape[0]
            sizes = [p[0].numel() for p in plist]
            flat = torch.empty(chains, sum(sizes), device=device, dtype=dtype)
            self.chunks.append(flat)
            offset = 0
            for p, n in zip(plist, sizes, strict=True):
                self.views[id(p)] = flat[:, offset : offset + n].view(p.shape)
                offset += n

    def normal_(self, generator: Any) -> None:
        """Row ``k`` of every chunk from ``generator[k]``.

        A row is one generator's sequential draw, so with several torch threads
        (``torch.get_num_threads()``) the rows are shared out among that many threads, the
        calling one included; the numbers are the same whatever the thread count.
        """
        for flat in self.chunks:
            pairs = list(zip(flat, _generators(generator, flat), strict=True))
            threads = min(torch.get_num_threads(), len(pairs))
            parts = [pairs[i::threads] for i in range(threads)]
            others = [_pool(threads - 1).submit(_fill_rows, part) for part in parts[1:]]
            _fill_rows(parts[0])
            for done in others:
                done.result()

    def rademacher_(self, generator: Any) -> None:
        """Row ``k`` of every chunk from ``generator[k]``."""
        for flat in self.chunks:
            for row, gen in zip(flat, _generators(generator, flat), strict=True):
                fill_rademacher_(row, gen)


def _fill_rows(pairs: list[tuple[Tensor, torch.Generator]]) -> None:
    for row, gen in pairs:
        fill_normal_(row, gen)


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` workers, made once per size and process (a forked child has
    none of its parent's threads); torch releases the GIL while it draws."""
    key = (os.getpid(), threads)
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="bayesflat-rng")
    return pool


def _generators(generator: Any, flat: Tensor) -> list[torch.Generator]:
    if not isinstance(generator, ChainGenerators) or len(generator) != flat.shape[0]:
        raise TypeError("a StackedBuffer draws from one generator per chain (ChainGenerators)")
    return generator


# -- what can be vectorised -----------------------------------------------------------------------


def check_vectorisable(spec: RunSpec) -> None:
    """Raise ``ValueError`` naming what keeps ``spec``'s chains from running vectorised."""
    if spec.target.kind != "module":
        raise ValueError(
            f"executor='vectorised' runs torch modules; a {spec.target.kind} target cannot be "
            f"batched across chains: {_FALLBACK}"
        )
    target = spec.target.build(0, torch.device("cpu"))
    module = target.module
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.track_running_stats:
            raise ValueError(
                f"executor='vectorised' cannot batch BatchNorm running statistics (module "
                f"{name!r}): {_FALLBACK}"
            )
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0:
            raise ValueError(
                f"executor='vectorised' cannot reproduce each chain's dropout masks (module "
                f"{name!r}): {_FALLBACK}"
            )
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"executor='vectorised' needs every parameter trainable (the sequential chains draw "
            f"noise for frozen ones too, and each chain's frozen values would have to be kept); "
            f"{frozen[0]!r} has requires_grad=False: {_FALLBACK}"
        )
    params = [p for p in module.parameters() if p.requires_grad]
    if len({(p.dtype, p.device) for p in params}) > 1:
        raise ValueError(
            f"executor='vectorised' needs every trainable parameter in one dtype: {_FALLBACK}"
        )
    sampler = make_sampler(
        spec.sampler, params, lr=spec.lr,
        num_data=spec.num_data, temperature=spec.temperature, generator=None,
        options=dict(spec.options),
    )  # fmt: skip
    est, dyn = sampler.estimator, sampler.dynamics
    hooks = [h for h in ("begin_chain", "recorded_state", "chain_draws") if hasattr(sampler, h)]
    elementwise = type(est) is PlainGradient or (
        isinstance(est, PerturbedGradient) and not est.filter_normalised
    )
    why = (
        f"its {est.name} gradient estimate couples the weights of a chain" if not elementwise
        else f"its {dyn.name} dynamics keeps per-weight state" if type(dyn) is not LangevinDynamics
        else f"it keeps a per-chain trajectory ({', '.join(hooks)})" if hooks
        else ""
    )  # fmt: skip
    if why:
        raise ValueError(
            f"executor='vectorised' supports samplers with element-wise updates (a plain or "
            f"perturbed gradient and Langevin dynamics: sgld, sgd, fsgld, rwp, ...), and "
            f"{spec.sampler!r} is not one: {why}; {_FALLBACK}"
        )
    if len(sampler.param_groups) != 1:
        raise ValueError(f"executor='vectorised' needs one param group: {_FALLBACK}")


# -- the batched potential ------------------------------------------------------------------------


def _linear_stack(module: nn.Module) -> list[nn.Module] | None:
    """The layers of ``module`` when it is a plain stack the fast path can batch, else None."""
    if not isinstance(module, nn.Sequential):
        return None
    layers = list(module)
    for layer in layers:
        if isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim != -1:
                return None
        elif not isinstance(layer, (nn.Linear, *_ELEMENTWISE)):
            return None
    return layers


class _BatchedForward:
    """``f(stacked params, X) -> outputs (K, |B|, ...)`` for the chains' module.

    For a stack of ``Linear`` layers and element-wise activations (the fast path) the
    activations are kept feature-major, ``(K, features, |B|)``: a layer is one
    ``baddbmm(b, W, h)`` with ``W`` the ``(K, out, in)`` weights as they are stored, and its
    gradients are two batched products written straight into the gradient buffer (no autograd
    graph). The categorical likelihood then normalises over the class dimension of
    ``(K, C, |B|)``, which is contiguous along the examples (``log_softmax`` over a last
    dimension of ten classes is several times slower). Other modules run through
    ``torch.func.vmap`` over ``functional_call`` and autograd.
    """

    def __init__(self, module: nn.Module, names: list[str]) -> None:
        self.module = module
        self.names = names
        self.layers = _linear_stack(module)
        self.prefix = {id(layer): name for name, layer in module.named_children()}
        linear = [i for i, layer in enumerate(self.layers or []) if isinstance(layer, nn.Linear)]
        self.first = linear[0] if linear else None
        self.flattens = self.first is not None and any(
            isinstance(layer, nn.Flatten) for layer in (self.layers or [])[: self.first]
        )

    def fast(self, x: Tensor, shared: bool) -> bool:
        """Whether the feature-major path runs inputs ``x`` (per chain, or ``shared``)."""
        return self.first is not None and (self.flattens or x.dim() == (2 if shared else 3))

    def __call__(self, stacked: dict[str, Tensor], x: Tensor) -> Tensor:
        """Outputs ``(K, |B|, ...)`` of every chain on its own inputs ``x`` ``(K, |B|, ...)``."""
        if self.fast(x, shared=False):
            with torch.no_grad():
                out, _ = self._forward(stacked, x.reshape(x.shape[0], x.shape[1], -1).mT)
            return out.mT
        from torch.func import functional_call, vmap

        def one(params: dict[str, Tensor], xb: Tensor) -> Tensor:
            return functional_call(self.module, params, (xb,))

        return vmap(one)(stacked, x)

    def predict(self, stacked: dict[str, Tensor], x: Tensor) -> Tensor:
        """Outputs ``(K, n, ...)`` of every chain on the same inputs ``x`` ``(n, ...)``."""
        with torch.no_grad():
            if self.fast(x, shared=True):
                chains = next(iter(stacked.values())).shape[0]
                h = x.reshape(x.shape[0], -1).T.expand(chains, -1, -1)
                return self._forward(stacked, h)[0].mT
            from torch.func import functional_call, vmap

            def one(params: dict[str, Tensor]) -> Tensor:
                return functional_call(self.module, params, (x,))

            return vmap(one)(stacked)

    def _forward(self, stacked: dict[str, Tensor], h: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Feature-major outputs ``(K, C, n)`` from inputs ``h`` ``(K, in, n)``, and the input
        of every layer from the first ``Linear`` on (what the backward pass reads)."""
        assert self.layers is not None and self.first is not None
        for layer in self.layers[: self.first]:
            if not isinstance(layer, nn.Flatten):
                h = layer(h.clone() if getattr(layer, "inplace", False) else h)
        inputs = []
        for layer in self.layers[self.first :]:
            inputs.append(h)
            if isinstance(layer, nn.Linear):
                name = self.prefix[id(layer)]
                weight, bias = stacked[f"{name}.weight"], stacked.get(f"{name}.bias")
                h = (
                    torch.bmm(weight, h)
                    if bias is None
                    else torch.baddbmm(bias[..., None], weight, h)
                )
            elif isinstance(layer, nn.Flatten):
                continue
            elif isinstance(layer, nn.ReLU):
                # in place: h is this pass's own tensor, and ReLU's backward reads the sign
                # of its output as well as of its input
                h = torch.relu_(h)
            else:
                h = layer(h.clone() if getattr(layer, "inplace", False) else h)
        return h, inputs

    def value_and_grad_(
        self,
        stacked: dict[str, Tensor],
        grads: dict[str, Tensor],
        x: Tensor,
        y: Tensor,
        likelihood: Any,
        accumulate: bool,
    ) -> Tensor:
        """Each chain's mean minibatch NLL ``(K,)``; its gradient is written (``accumulate``:
        added) into ``grads``, tensors shaped like ``stacked``. Fast path only."""
        with torch.no_grad():
            out, inputs = self._forward(stacked, x.reshape(x.shape[0], x.shape[1], -1).mT)
            nll, g = _nll_and_grad(likelihood, out, y)
            beta = 1.0 if accumulate else 0.0
            assert self.layers is not None
            layers = self.layers[self.first :]
            for i in range(len(layers) - 1, -1, -1):
                layer, h = layers[i], inputs[i]
                if isinstance(layer, nn.Linear):
                    name = self.prefix[id(layer)]
                    grads[f"{name}.weight"].baddbmm_(g, h.mT, beta=beta)
                    if layer.bias is not None:
                        gb = grads[f"{name}.bias"]
                        if accumulate:
                            gb.add_(g.sum(dim=2))
                        elif gb.is_contiguous():
                            torch.sum(g, dim=2, out=gb)
                        else:
                            gb.copy_(g.sum(dim=2))
                    if i > 0:
                        g = torch.bmm(stacked[f"{name}.weight"].mT, g)
                elif isinstance(layer, nn.ReLU):
                    g = torch.ops.aten.threshold_backward(g, h, 0)
                elif not isinstance(layer, nn.Flatten):
                    with torch.enable_grad():
                        z = h.detach().requires_grad_(True)
                        (g,) = torch.autograd.grad(layer(z.clone()), z, g)
        return nll


def _nll_and_grad(likelihood: Any, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean NLL per chain ``(K,)`` of feature-major outputs ``out`` ``(K, C, |B|)`` against
    ``y`` ``(K, |B|, ...)``, and its gradient with respect to ``out``.

    For integer class labels the categorical gradient is the closed form
    ``(softmax(f) - onehot(y)) / |B|``; other likelihoods go through autograd.
    """
    chains, batch = out.shape[0], out.shape[-1]
    if type(likelihood) is CategoricalLikelihood and not y.is_floating_point():
        index = y.reshape(chains, 1, batch)
        log_p = torch.log_softmax(out, dim=1)
        nll = log_p.gather(1, index).view(chains, batch).mean(dim=1).neg_()
        grad = log_p.exp_()
        grad.scatter_add_(1, index, torch.full_like(index, -1, dtype=grad.dtype))
        return nll, grad.div_(batch)
    with torch.enable_grad():
        f = out.mT.detach().requires_grad_(True)
        nll = likelihood.nll(f.flatten(0, 1), y.flatten(0, 1)).view(chains, batch).mean(dim=1)
        (grad,) = torch.autograd.grad(nll.sum(), f)
    return nll.detach(), grad.mT


class _BatchedTarget:
    """The chains' weights stacked, and their potentials as one computation.

    The weights live in one plain tensor :attr:`flat` of shape ``(K, P)``: row ``k`` is chain
    ``k``'s trainable parameters concatenated in the module's order (the layout of one chain's
    :class:`FlatBuffer`). :attr:`params` are leaf views of it, one ``(K, *shape)`` tensor per
    parameter, which the layers read and the sampler updates in place; the prior's value is
    read off :attr:`flat` in one reduction per prior scale.
    """

    def __init__(self, target: Any, rows: Sequence[dict[str, Tensor]]) -> None:
        self.likelihood = target.likelihood
        self.prior = target.prior
        self.num_data = target.num_data
        first = rows[0]
        self.layout: list[tuple[str, int, int, torch.Size]] = []
        offset = 0
        for name, p in first.items():
            self.layout.append((name, offset, offset + p.numel(), p.shape))
            offset += p.numel()
        self.flat = torch.stack([torch.cat([p.detach().reshape(-1) for p in row.values()])
                                 for row in rows])  # fmt: skip
        self.params = {n: v.requires_grad_(True) for n, v in self.views(self.flat).items()}
        for name, p in self.params.items():
            if all(row[name].grad is not None for row in rows):
                p.grad = torch.stack([row[name].grad for row in rows])
        self.forward = _BatchedForward(target.module, list(first))
        # one contiguous (K, *shape) tensor per parameter: batched products write into it
        self.grad_views = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.by_precision: dict[float, list[Tensor]] = {}
        self.segments: list[tuple[int, int, float]] = []
        if isinstance(self.prior, GaussianPrior):
            for name, a, b, _ in self.layout:
                precision = 1.0 / self.prior.scale_for(name) ** 2
                self.by_precision.setdefault(precision, []).append(self.params[name])
                if self.segments and self.segments[-1][2] == precision:
                    self.segments[-1] = (self.segments[-1][0], b, precision)
                else:
                    self.segments.append((a, b, precision))

    def views(self, flat: Tensor) -> dict[str, Tensor]:
        """Parameter ``name`` of every chain, ``(K, *shape)``, as a view of ``flat``."""
        k = flat.shape[0]
        return {name: flat[:, a:b].view(k, *shape) for name, a, b, shape in self.layout}

    def row(self, k: int, flat: Tensor) -> dict[str, Tensor]:
        """Chain ``k``'s parameters as views of ``flat``."""
        return {name: flat[k, a:b].view(shape) for name, a, b, shape in self.layout}

    def closure(self, x: Tensor, y: Tensor, value: bool = True) -> Callable[[], Tensor]:
        """Closure leaving each chain's gradient of ``L_B`` in its row.

        It returns the ``K`` potentials ``L_B`` (mean-loss units) when ``value`` is true, and
        only their likelihood part (enough to check finiteness) otherwise: the prior's value is
        computed only at the steps where the potential is read.
        """
        chains, batch = x.shape[0], x.shape[1]
        fast = self.forward.fast(x, shared=False)

        def closure() -> Tensor:
            if fast:
                params = self.params
                accumulate = all(p.grad is not None for p in params.values())
                if not accumulate:
                    for name, p in params.items():
                        p.grad = self.grad_views[name]
                grads = {name: p.grad for name, p in params.items()}
                nll = self.forward.value_and_grad_(params, grads, x, y, self.likelihood, accumulate)
            else:
                out = self.forward(self.params, x)
                nll = self.likelihood.nll(out.flatten(0, 1), y.flatten(0, 1)).view(chains, batch)
                nll = nll.mean(dim=1)
                nll.sum().backward()
                nll = nll.detach()
            prior = self._prior_(value)
            return nll if prior is None else nll + prior / self.num_data

        return closure

    def _prior_(self, value: bool) -> Tensor | None:
        """Add the prior's gradient ``grad(-log p) / N`` per row; return ``-log p`` per chain
        (``None`` for a flat prior, or for a Gaussian one when ``value`` is false)."""
        flat = self.flat
        if isinstance(self.prior, FlatPrior):
            return None
        if isinstance(self.prior, GaussianPrior):
            with torch.no_grad():
                for precision, params in self.by_precision.items():
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                    torch._foreach_add_(
                        [p.grad for p in params], params, alpha=precision / self.num_data
                    )
                if not value:
                    return None
                total = None
                for a, b, precision in self.segments:
                    value = torch.linalg.vector_norm(flat[:, a:b], dim=1).square_()
                    value = value.mul_(0.5 * precision)
                    total = value if total is None else total.add_(value)
            assert total is not None
            return total
        values = [self.prior.neg_log_prob(self.row_of_params(k)) for k in range(flat.shape[0])]
        zero = torch.zeros((), dtype=flat.dtype, device=flat.device)
        per_chain = torch.stack([zero if v is None else v for v in values])
        if per_chain.requires_grad:
            with torch.enable_grad():
                (per_chain.sum() / self.num_data).backward()
        return per_chain.detach()

    def row_of_params(self, k: int) -> dict[str, Tensor]:
        """Chain ``k``'s parameters, differentiable (rows of :attr:`params`)."""
        return {name: p[k] for name, p in self.params.items()}


# -- one chain's bookkeeping ----------------------------------------------------------------------


class _Chain:
    """What the sequential executor would hold for chain ``index``: module, sampler, stream."""

    def __init__(self, spec: RunSpec, index: int, device: torch.device) -> None:
        seeds = chain_seeds(spec.seed, index)
        self.index = index
        self.target = spec.target.build(seeds.init, device)
        self.module = self.target.module
        self.params = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        self.sampler = make_sampler(
            spec.sampler, list(self.params.values()), lr=spec.lr, num_data=spec.num_data,
            temperature=spec.temperature,
            generator=torch.Generator(device=device).manual_seed(seeds.noise),
            options=dict(spec.options),
        )  # fmt: skip
        self.stream = MinibatchStream(spec.train, spec.batch_size, seeds.data, device)
        loo_x, loo_y = _loo_data(spec, self.target, device)
        self.recorder = _Recorder(
            spec, self.target, self.sampler, device, loo_x, loo_y,
            projection_directions(spec, self.module),
        )  # fmt: skip
        with torch.random.fork_rng(devices=_rng_devices(device)):
            torch.manual_seed(seeds.model)
            self.rng = torch.get_rng_state()
        self.state = ChainState(chain=index)
        self.last = self.state

    @contextlib.contextmanager
    def own_rng(self) -> Any:
        """Torch's global generator as this chain's (nothing in a vectorised step draws from it)."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng)
            yield
            self.rng = torch.get_rng_state()

    def restore(self, state: ChainState) -> None:
        with self.own_rng():
            state.restore(self.module, self.sampler, self.stream)
            self.rng = torch.get_rng_state()
        self.state = self.last = state

    def pull(self, batched: _BatchedTarget, row: int, shared: Sampler, loss: Tensor) -> None:
        """Copy row ``row`` of the stacked weights, gradients and step counters into the chain."""
        with torch.no_grad():
            for name, p in self.params.items():
                src = batched.params[name]
                p.copy_(src[row])
                p.grad = None if src.grad is None else src.grad[row].clone()
        for mine, theirs in zip(self.sampler.param_groups, shared.param_groups, strict=True):
            for key, value in theirs.items():
                if key != "params":
                    mine[key] = value
        self.sampler._last_loss = loss[row]

    def snapshot(self) -> ChainState:
        with self.own_rng():
            return snapshot(self.state, self.module, self.sampler, self.stream)


# -- the loop -------------------------------------------------------------------------------------


def run_vectorised(
    spec: RunSpec,
    chains: Sequence[int],
    sink: Any,
    states: dict[int, ChainState],
    *,
    folder: Any,
    progress: Any,
    stop: Any,
    checkpoint_every: int | None,
    checkpoint_interval: float,
) -> list[Any]:
    """Run ``chains`` vectorised; same arguments and outcomes as ``run_sequential``.

    Chains resumed at different steps (from a run made by another executor) advance in
    separate lockstep groups, one group after another.
    """
    from bayesflat.run.executors import ChainOutcome

    check_vectorisable(spec)
    device = torch.device(spec.device)
    held = [_Chain(spec, c, device) for c in chains]
    for chain in held:
        if chain.index in states:
            chain.restore(states[chain.index])
    groups: dict[int, list[_Chain]] = {}
    for chain in held:
        groups.setdefault(chain.state.step, []).append(chain)
    outcomes: list[Any] = []
    for step in sorted(groups):
        group = groups[step]
        try:
            _lockstep(
                spec, group, sink, device,
                checkpoint=folder.save_checkpoint if folder is not None else None,
                checkpoint_every=checkpoint_every, checkpoint_interval=checkpoint_interval,
                progress=progress.update, should_stop=stop.is_set,
            )  # fmt: skip
        except ChainFailure as err:
            outcomes += [
                ChainOutcome(c.index, "failed", str(err), err.step)
                if c.index == err.chain
                else ChainOutcome(c.index, "stopped", "", c.state.step)
                for c in group
            ]
            return outcomes
        except _Stopped:
            outcomes += [ChainOutcome(c.index, "stopped", "", c.state.step) for c in group]
            return outcomes
        outcomes += [ChainOutcome(c.index, "done") for c in group]
    return outcomes


class _Stopped(Exception):
    pass


def _log_softmax_classes(outputs: Tensor) -> Tensor:
    """``log_softmax`` of logits ``(K, n, C)`` over the classes, computed class-major."""
    return torch.log_softmax(outputs.float().mT, dim=1).mT


class _Evaluation:
    """What every chain's kept draw evaluates, as batched computations over the chains.

    The outputs on the evaluation sets and on the ``log_likelihood`` training points come from
    one batched forward per ``eval_batch_size`` examples (:meth:`_BatchedForward.predict`); the
    weight norms and random projections from the stacked weights (one matrix product for the
    projections). They equal what each chain's :class:`~bayesflat.run.chain._Recorder`
    computes on its own module, to float rounding.
    """

    def __init__(self, spec: RunSpec, batched: _BatchedTarget, chain: _Chain) -> None:
        self.spec = spec
        self.batched = batched
        self.loo_x = chain.recorder.loo_x
        self.categorical = type(batched.likelihood) is CategoricalLikelihood
        directions = chain.recorder.directions
        self.directions = (
            None if directions is None
            else torch.stack([torch.cat([d.reshape(-1) for d in ds]) for ds in directions], dim=1)
        )  # fmt: skip

    def __call__(self) -> list[Computed]:
        """One :class:`Computed` per chain, in row order."""
        spec, batched = self.spec, self.batched
        size = spec.eval_batch_size
        device = batched.flat.device
        outputs = {
            s.name: torch.cat(
                [batched.forward.predict(batched.params, xb) for xb in s.batches(size, device)],
                dim=1,
            )
            for s in spec.eval_sets
        }
        train = None
        if self.loo_x is not None:
            chunks = [self.loo_x[a : a + size] for a in range(0, len(self.loo_x), size)]
            train = torch.cat([batched.forward.predict(batched.params, xb) for xb in chunks], 1)
        with torch.no_grad():
            flat = batched.flat
            norms = torch.stack(
                [torch.linalg.vector_norm(flat[:, a:b], dim=1) for _, a, b, _ in batched.layout],
                dim=1,
            )
            norms_host = norms.float().cpu().numpy()
            projections = None
            if self.directions is not None:
                projections = (flat @ self.directions).double().cpu().numpy()
        log_probs: dict[str, Tensor] = {}
        train_log_probs = None
        if self.categorical:
            # over the classes of (K, C, n): contiguous along the examples, the fast layout;
            # only labelled sets need them (their held-out log-likelihood), as stored
            # probabilities come from predictive.softmax of the outputs
            labelled = {s.name for s in spec.eval_sets if s.labels is not None}
            log_probs = {n: _log_softmax_classes(o) for n, o in outputs.items() if n in labelled}
            train_log_probs = None if train is None else _log_softmax_classes(train)
        out = []
        for k in range(flat.shape[0]):
            functionals = {"weight_norm": norms_host[k]}
            if projections is not None:
                functionals["projection"] = projections[k]
            out.append(
                Computed(
                    outputs={name: o[k] for name, o in outputs.items()},
                    train_outputs=None if train is None else train[k],
                    functionals=functionals,
                    log_probs={n: lp[k] for n, lp in log_probs.items()} if log_probs else None,
                    train_log_probs=None if train_log_probs is None else train_log_probs[k],
                )
            )
        return out


def _minibatches(live: list[_Chain]) -> tuple[Tensor, Tensor]:
    """Every chain's next minibatch, stacked ``(K, |B|, ...)``; one gather for tensor data."""
    first = live[0].stream
    if first.data.is_tensors:
        idx = torch.stack([c.stream.next_indices() for c in live]).to(first.device)
        flat = idx.view(-1)
        x, y = first._x.index_select(0, flat), first._y.index_select(0, flat)
        return x.view(*idx.shape, *x.shape[1:]), y.view(*idx.shape, *y.shape[1:])
    batches = [next(c.stream) for c in live]
    return torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])


def _lockstep(
    spec: RunSpec,
    group: list[_Chain],
    sink: Any,
    device: torch.device,
    *,
    checkpoint: Callable[[ChainState], None] | None,
    checkpoint_every: int | None,
    checkpoint_interval: float,
    progress: Callable[..., None],
    should_stop: Callable[[], bool],
) -> None:
    live = [c for c in group if not c.state.done]
    if not live:
        return
    batched = _BatchedTarget(live[0].target, [c.params for c in live])
    shared = make_sampler(
        spec.sampler, list(batched.params.values()), lr=spec.lr, num_data=spec.num_data,
        temperature=spec.temperature, generator=None, options=dict(spec.options),
    )  # fmt: skip
    shared.generator = ChainGenerators(c.sampler.generator for c in live)
    shared.buffer_type = StackedBuffer
    for chain in live:  # their statistics read the shared estimator's and dynamics' state
        chain.sampler.estimator, chain.sampler.dynamics = shared.estimator, shared.dynamics
    for mine, theirs in zip(shared.param_groups, live[0].sampler.param_groups, strict=True):
        mine["step"] = theirs["step"]
    first = live[0].state
    step, collected, points, kept = first.step, first.collected, first.points, first.kept
    running = torch.tensor([c.state.running for c in live], dtype=torch.float64)
    planned = live[0].sampler.planned_steps(spec.burn_in, spec.draws, spec.thin)
    report_every = max(1, planned // 100)
    since = time.monotonic()
    evaluate = _Evaluation(spec, batched, live[0])
    for chain in live:
        sink.begin(chain.index, kept)
        chain.module.train()

    def save(final: bool = False) -> None:
        nonlocal since
        for chain in live:
            sink.flush(chain.index)
            if checkpoint is not None:
                checkpoint(chain.last.finished() if final else chain.last)
        since = time.monotonic()

    def due() -> bool:
        if sum(sink.pending_bytes(c.index) for c in live) > _FLUSH_BYTES:
            return True
        if checkpoint_every:
            return kept % checkpoint_every == 0
        return time.monotonic() - since >= checkpoint_interval

    try:
        while points < spec.draws:
            read = reads_potential(step, collected, spec, report_every)
            x, y = _minibatches(live)
            loss = shared.step(batched.closure(x, y, value=read)).double().cpu()
            step += 1
            if not bool(torch.isfinite(loss).all()):
                k = int((~torch.isfinite(loss)).nonzero()[0])
                raise ChainFailure(
                    f"non-finite potential {float(loss[k])} at chain {live[k].index}, "
                    f"step {step - 1}",
                    chain=live[k].index,
                    step=step - 1,
                )
            if read:
                running = torch.where(torch.isnan(running), loss, 0.98 * running + 0.02 * loss)
            if step > spec.burn_in:
                collected += 1
                if collected % spec.thin == 0:
                    points += 1
                    computed = evaluate()
                    for row, chain in enumerate(live):
                        chain.pull(batched, row, shared, loss)
                        record = chain.recorder.record(
                            step - 1, {}, chain.index, kept, computed[row]
                        )
                        sink.write(chain.index, kept, record)
                    kept += 1
                    for row, chain in enumerate(live):
                        chain.state = ChainState(
                            chain.index, step, collected, points, kept, float(running[row])
                        )
                        # the module's and generators' state matter only to a checkpoint
                        chain.last = chain.snapshot() if checkpoint else chain.state
                    if due():
                        save()
            if step % report_every == 0:
                for row, chain in enumerate(live):
                    progress(chain.index, step, planned, kept, float(running[row]))
            if should_stop():
                raise _Stopped
    except (ChainFailure, _Stopped, KeyboardInterrupt):
        save()
        raise
    for row, chain in enumerate(live):
        progress(chain.index, planned, planned, kept, float(running[row]))
    save(final=True)
    for chain in live:
        chain.state = chain.last = chain.last.finished()
