"""Sparse-aware optimizers for embedding tables.

Each optimizer takes layers (objects with ``weight``, ``grad`` and ``requires_grad``,
such as :class:`sparsembed.Embedding` and :class:`sparsembed.EmbeddingBag`) and
updates their weights in place from their gradients:

- a dense ``grad`` (ndarray of the table's shape) updates every row, as torch does;
- a row-sparse ``grad`` (scipy.sparse csr) updates only its stored rows, in
  O(rows touched x dim) work: untouched rows and their optimizer state are not read.

The updates run in compiled kernels, one thread per row; the result does not depend
on the number of threads. Optimizer state (momentum, accumulators, moments) is
allocated once per table, on its first update, in the table's dtype.

float16 tables: state and gradients are float32, and every update is computed in
float32 on a copy of the touched rows and rounded once to float16 when stored
(``sparsembed._half``), so a step equals the same step on a float32 copy of the
table followed by rounding the table to float16.

Fused backward + update: ``layer.backward(grad_output, optimizer=opt)`` sums each
touched row's gradient and applies ``opt``'s update to it in the same pass, without
building the gradient matrix. It always applies the touched-rows (sparse) form of the
update: for a sparse layer whose ``grad`` is None it equals
``layer.backward(grad_output)`` then ``opt.step()`` (a gradient already in ``grad``
is neither applied nor changed by it).

Like torch, ``params`` may also be a list of dicts (parameter groups), each with a
``"params"`` list and its own hyper-parameters overriding the defaults; hyper-parameters
are read from ``opt.param_groups`` at every step, so they can be changed between steps
(learning-rate schedules). A layer may appear only once in ``params`` (across all
groups): a repeat is a ValueError (torch 2.13 warns that it will refuse it, and
updates such a layer twice per step meanwhile).
"""

import math
import numbers

import numpy as np
import scipy.sparse as sp

from sparsembed import _aligned, _half, _rowsparse
from sparsembed._backend import backend_of
from sparsembed._kernels import _optim

__all__ = ["Optimizer", "SGD", "Adagrad", "SparseAdam", "RowWiseAdagrad"]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))


def _check_number(value, name, *, low=0.0, low_inclusive=True, high=None):
    """A real number in range, else ValueError naming it (torch's "Invalid ..." style)."""
    # plain floats and ints skip the ABC check (0.4 us of 0.6: the optimizers check
    # their groups at every step)
    if type(value) is not float and type(value) is not int and (
            isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise ValueError(f"Invalid {name} value: {value!r} (expected a real number)")
    v = float(value)
    ok = v >= low if low_inclusive else v > low
    if high is not None:
        ok = ok and v < high
    if not ok:  # NaN fails every comparison
        bound = f"{'>=' if low_inclusive else '>'} {low}"
        if high is not None:
            bound += f" and < {high}"
        raise ValueError(f"Invalid {name} value: {value!r} (must be {bound})")
    return v


def _check_layer(layer):
    for attr in ("weight", "grad", "requires_grad"):
        if not hasattr(layer, attr):
            raise ValueError(
                "optimizer params must be layers with weight, grad and requires_grad "
                f"attributes (e.g. sparsembed.Embedding), got {type(layer).__name__!r} "
                f"without {attr!r}"
            )
    w = layer.weight
    if not isinstance(w, np.ndarray) and not hasattr(w, "__cuda_array_interface__"):
        raise ValueError(
            f"optimizer params must hold numpy (device 'cpu') or CuPy (device 'cuda') "
            f"tables, got a weight of type {type(w).__module__}.{type(w).__name__}"
        )
    if w.ndim != 2 or w.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"optimizer params need a 2-D float32, float64 or float16 weight, got shape "
            f"{w.shape} and dtype {w.dtype}"
        )


def _writable_weight(layer):
    """The layer's weight, checked again at every update (it may have been replaced)."""
    _check_layer(layer)
    w = layer.weight
    if not getattr(w.flags, "writeable", True) or not w.flags.c_contiguous:
        raise ValueError(
            f"{type(layer).__name__}.weight must be a writable C-contiguous array "
            "for the optimizer to update it in place"
        )
    return w


class Optimizer:
    """Base class: parameter groups, per-table state, step / zero_grad / state_dict.

    Subclasses define ``_kind`` (the kernel's update), ``_state_keys`` (state arrays,
    with their per-row width: "dim" or 1), ``_check_group`` (hyper-parameter checks)
    and ``_hyper`` (the kernel's scalars for one update).
    """

    _kind: int | None = None
    _state_keys: tuple[tuple[str, str | int], ...] = ()

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        if isinstance(params, dict) or hasattr(params, "weight"):
            raise ValueError(
                "params must be an iterable of layers or of dicts, got a single "
                f"{type(params).__name__}; wrap it in a list"
            )
        try:
            params = list(params)
        except TypeError:
            raise ValueError(
                f"params must be an iterable of layers or of dicts, got {type(params).__name__}"
            ) from None
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = []
        seen = set()
        for group in groups:
            if not isinstance(group, dict):
                raise ValueError(
                    "params must be all layers or all dicts (parameter groups), got a "
                    f"{type(group).__name__} among dicts"
                )
            if "params" not in group:
                raise ValueError("a parameter group must have a 'params' entry")
            self._check_known(group)
            layers = group["params"]
            layers = [layers] if hasattr(layers, "weight") else list(layers)
            for layer in layers:
                if isinstance(layer, dict):
                    raise ValueError(
                        "params must be all layers or all dicts, got a dict among layers"
                    )
                _check_layer(layer)
                if id(layer) in seen:
                    raise ValueError("some layers appear more than once in the optimizer's params")
                seen.add(id(layer))
            full = dict(self.defaults)
            full.update({k: v for k, v in group.items() if k != "params"})
            self._check_group(full)
            full["params"] = layers
            self.param_groups.append(full)
        for layer in self._layers():
            self._check_layer_kind(layer)
        self.state = {}  # layer index -> dict of state (torch's state_dict keys)
        # layer index -> a one-entry int64 array in a checkpoint loaded with
        # mmap_mode="r+" that mirrors the step count (see sparsembed.serialization)
        self._step_files = {}
        self._reindex()

    # -- bookkeeping --------------------------------------------------------------

    def _layers(self):
        return [layer for group in self.param_groups for layer in group["params"]]

    def _reindex(self):
        self._where = {}
        i = 0
        for group in self.param_groups:
            for layer in group["params"]:
                self._where[id(layer)] = (i, group)
                i += 1

    def _locate(self, layer):
        try:
            return self._where[id(layer)]
        except KeyError:
            raise ValueError(
                f"{type(layer).__name__} is not among this optimizer's params"
            ) from None

    def _locate_checked(self, layer):
        """:meth:`_locate`, and the group's hyper-parameters checked again (they may
        have been edited since): an update of one layer outside :meth:`step`."""
        i, group = self._locate(layer)
        self._check_group(group)
        return i, group

    def _target(self, layer):
        """``(i, group, weight)`` of a layer updated outside :meth:`step`: located, its
        group's hyper-parameters and its table checked again."""
        i, group = self._locate_checked(layer)
        return i, group, _writable_weight(layer)

    def _check_update(self, layer):
        """Every check an update of ``layer`` outside :meth:`step` makes before it
        writes (a caller updating two tables checks both before either is written)."""
        self._check_state(*self._target(layer))

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_where"]
        state.pop("_step_files", None)  # a copy would mirror no file
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._step_files = {}
        self._reindex()

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(k for k in group if k != "params"):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)

    def _check_layer_kind(self, layer):
        pass

    def _state_keys_for(self, group):
        return self._state_keys

    def _state_shapes(self, group, weight):
        n, d = weight.shape
        return {key: (n, d) if width == "dim" else (n,)
                for key, width in self._state_keys_for(group)}

    def _new_state_array(self, key, group, shape, dtype, xp=np):
        if xp is np:
            return _aligned.zeros(shape, dtype)
        return xp.zeros(shape, dtype=dtype)

    def _check_state(self, i, group, weight):
        """Raise if the table's existing state does not fit it (before any write)."""
        st = self.state.get(i, {})
        step = st.get("step", 0)
        # a public dict: a counter edited by hand failed only at its own table's
        # update, after the tables before it had been updated
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise RuntimeError(f"optimizer state 'step' of param {i} must be a "
                               f"non-negative integer, got {step!r}")
        for key, shape in self._state_shapes(group, weight).items():
            arr = st.get(key)
            if arr is None:
                continue
            dtype = _half.compute_dtype(weight.dtype)
            if not isinstance(arr, backend_of(weight).xp.ndarray) or arr.dtype != dtype \
                    or arr.shape != shape or not arr.flags.c_contiguous \
                    or not getattr(arr.flags, "writeable", True):
                raise RuntimeError(
                    f"optimizer state {key!r} of param {i} does not fit its table "
                    f"(expected a writable C-contiguous {dtype} array of shape {shape})"
                )

    def _get_state(self, i, group, weight):
        """The table's state (its arrays allocated once, on first use) and the keys
        allocated by this call."""
        self._check_state(i, group, weight)
        st = self.state.setdefault(i, {"step": 0})
        created = set()
        for key, shape in self._state_shapes(group, weight).items():
            if st.get(key) is None:
                st[key] = self._new_state_array(key, group, shape,
                                                _half.compute_dtype(weight.dtype),
                                                xp=backend_of(weight).xp)
                created.add(key)
        return st, created

    @staticmethod
    def _kernel_state(st, keys, weight):
        """The two state arrays as (rows, width) C-contiguous views, or (0, 1) dummies."""
        out = []
        for key, _ in keys:
            a = st[key]
            out.append(a if a.ndim == 2 else a.reshape(a.shape[0], 1))
        while len(out) < 2:
            out.append(backend_of(weight).xp.empty((0, 1),
                                                   dtype=_half.compute_dtype(weight.dtype)))
        return out

    # -- gradients -----------------------------------------------------------------

    def _prepare_grad(self, layer):
        """Validated (rows or None, values) for the layer's grad, in the weight's dtype."""
        w = _writable_weight(layer)
        return backend_of(w).optim_grad(layer.grad, w)

    @staticmethod
    def _prepare_host_grad(g, w):
        """The CPU side of ``_prepare_grad`` (``sparsembed._cpu.optim_grad``)."""
        if sp.issparse(g):
            if tuple(g.shape) != w.shape:
                raise ValueError(f"grad has shape {tuple(g.shape)}, expected {w.shape}")
            if g.dtype.kind != "f":
                raise TypeError(f"grad must be a float array, got dtype {g.dtype}")
            rows, values = _rowsparse.row_values(g)  # any format, structure checked
            rows = np.ascontiguousarray(rows, dtype=np.int64)
            values = np.ascontiguousarray(values, dtype=_half.compute_dtype(w.dtype))
            return rows, values
        if isinstance(g, np.ndarray):
            if g.shape != w.shape:
                raise ValueError(f"grad has shape {g.shape}, expected {w.shape}")
            if g.dtype.kind != "f":
                raise TypeError(f"grad must be a float array, got dtype {g.dtype}")
            return None, np.ascontiguousarray(g, dtype=_half.compute_dtype(w.dtype))
        raise TypeError(
            f"grad must be an ndarray or a scipy.sparse matrix, got {type(g).__name__}"
        )

    # -- the public interface -------------------------------------------------------

    def step(self, closure=None):
        """Update every layer that has a gradient (frozen layers are skipped).

        Parameters
        ----------
        closure : callable, optional
            Called first; its return value (the loss) is returned.

        Returns
        -------
        The closure's result, or None.
        """
        loss = closure() if closure is not None else None
        work = []
        i = 0
        for group in self.param_groups:
            checked = False
            for layer in group["params"]:
                if layer.requires_grad and layer.grad is not None:
                    if not checked:  # hyper-parameters may have been edited since
                        self._check_group(group)
                        checked = True
                    self._check_grad_kind(layer)
                    rows, values = self._prepare_grad(layer)
                    self._check_state(i, group, layer.weight)
                    work.append((i, group, layer, rows, values))
                i += 1
        # everything is validated, and every table's state allocated, before the
        # first write: a MemoryError for the last table's state leaves the tables
        # before it unchanged (and no state half made), not updated twice on a retry
        targets = [(i, group, layer.weight) for i, group, layer, _, _ in work]
        prepared = self._prepare_states(targets)
        for n, ((i, group, layer, rows, values), ready) in enumerate(zip(work, prepared)):
            try:
                self._apply(i, group, layer.weight, rows, values, ready)
            except BaseException:  # the tables not reached drop their new state too
                self._restore_states(targets[n + 1:], prepared[n + 1:])
                raise
        return loss

    def _prepare_states(self, targets):
        """:meth:`_prepare_state` of every ``(i, group, weight)`` target, in order; if
        one fails, none keeps state allocated here."""
        prepared = []
        try:
            for target in targets:
                prepared.append(self._prepare_state(*target))
        except BaseException:
            self._restore_states(targets, prepared)
            raise
        return prepared

    def _restore_states(self, targets, prepared):
        for (i, _, _), (before, _) in zip(targets, prepared):
            self._restore_state(i, before)

    def _check_grad_kind(self, layer):
        pass

    def _check_known(self, group):
        """ValueError naming the keys of a parameter group that are not this
        optimizer's hyper-parameters (nor ``params``)."""
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise ValueError(f"unknown hyper-parameters in a parameter group: {sorted(unknown)}")

    def _prepare_state(self, i, group, weight):
        """Allocate table ``i``'s missing state; return its state as it was before
        (None: it had none) and the keys allocated now. Nothing changes if it raises."""
        before = dict(self.state[i]) if i in self.state else None
        try:
            _, created = self._get_state(i, group, weight)
        except BaseException:
            self._restore_state(i, before)
            raise
        return before, created

    def _restore_state(self, i, before):
        if before is None:
            self.state.pop(i, None)
        else:
            st = self.state[i]
            st.clear()
            st.update(before)

    def _update(self, i, group, weight, launch, prepared=None):
        """One update of table ``i``: ``launch(hyper, s1, s2)`` runs the kernel with the
        state counted one step on. The kernels refuse bad arguments before writing
        anything, so if it raises the state is put back as it was (new arrays and the
        step count dropped). ``prepared``: what :meth:`_prepare_state` returned for
        this table, when the caller allocated the state already."""
        before, created = prepared if prepared is not None else \
            self._prepare_state(i, group, weight)
        st = self.state[i]
        st["step"] += 1
        try:
            s1, s2 = self._kernel_state(st, self._state_keys_for(group), weight)
            launch(self._hyper(group, st, created), s1, s2)
        except Exception:
            self._restore_state(i, before)
            raise
        step_file = self._step_files.get(i)
        if step_file is not None:
            step_file[0] = st["step"]

    def _apply(self, i, group, weight, rows, values, prepared=None):
        self._update(i, group, weight, lambda hyper, s1, s2: backend_of(weight).optim_update_rows(
            self._kind, hyper, weight, rows, values, s1, s2), prepared)

    def _apply_rows(self, layer, rows, values):
        """Update the given distinct sorted ``rows`` of ``layer`` with gradient ``values``.

        The touched-rows form of one step for one layer (used by the layers' fused
        backward where the row gradient must be built first, e.g. max-mode bags).
        """
        i, group, w = self._target(layer)
        xp = backend_of(w).xp
        rows = xp.ascontiguousarray(rows, dtype=np.int64)
        values = xp.ascontiguousarray(values, dtype=_half.compute_dtype(w.dtype))
        if values.shape != (rows.shape[0], w.shape[1]) or (
                rows.size and (rows[0] < 0 or rows[-1] >= w.shape[0])):
            raise ValueError(f"rows {rows.shape} / values {values.shape} do not fit a table "
                             f"of shape {w.shape}")
        self._apply(i, group, w, rows, values)

    def _fused_update(self, layer, grad, plan, scale_grad_by_freq=False, src=None, scale=None,
                      argmax=None, prepared=None):
        """Fused backward + update of ``layer``: see the module docstring.

        Parameters
        ----------
        layer : a layer among this optimizer's params
        grad : ndarray of shape (n_src, dim)
            C-contiguous gradient rows in the table's dtype.
        plan : RowPlan
            The batch's row plan (perm, rows, starts).
        scale_grad_by_freq : bool
            Divide each row's sum by its number of occurrences.
        src : ndarray of shape (n,), int64, optional
            Entry ``e`` reads gradient row ``src[e]`` (default: row ``e``).
        scale : ndarray of shape (n,), optional
            Entry ``e``'s contribution is multiplied by ``scale[e]``.
        argmax : ndarray of shape (n_src, dim), int64, optional
            With ``src``: entry ``e`` only sends the columns ``j`` where
            ``argmax[src[e], j] == e`` (EmbeddingBag's max mode).
        prepared : tuple, optional
            The table's state, allocated already by :meth:`_prepare_states` (a caller
            updating two tables allocates both states before either is written).
        """
        i, group, w = self._target(layer)
        be = backend_of(w)
        dtype = _half.compute_dtype(w.dtype)  # float32 for a float16 table
        grad = be.xp.ascontiguousarray(grad, dtype=dtype)
        # the update writes the table and its state rows while it reads grad's: a
        # grad_output sharing their memory (the table itself, say) would be read
        # after its rows were updated
        if any(isinstance(a, be.xp.ndarray) and be.xp.may_share_memory(grad, a)
               for a in (w, *self.state.get(i, {}).values())):
            grad = grad.copy()
        src = None if src is None else be.xp.ascontiguousarray(src, dtype=np.int64)
        scale = (None if scale is None
                 else be.xp.ascontiguousarray(scale, dtype=dtype).reshape(-1))
        if argmax is not None:
            if src is None:
                raise ValueError("argmax needs src (the entry -> bag map)")
            argmax = be.xp.ascontiguousarray(argmax, dtype=np.int64)
        self._update(i, group, w, lambda hyper, s1, s2: be.optim_fused_update(
            self._kind, hyper, w, grad, plan, src, scale, bool(scale_grad_by_freq), s1, s2,
            argmax=argmax), prepared)

    def zero_grad(self, set_to_none=True):
        """Set every layer's ``grad`` to None (torch's default ``set_to_none=True``).

        With ``set_to_none=False``, dense gradients are zero-filled in place and sparse
        ones dropped.
        """
        for layer in self._layers():
            if set_to_none or not _is_dense(layer.grad):
                layer.grad = None
            else:
                backend_of(layer.grad).zero_grad_(layer.grad)

    def state_dict(self):
        """Optimizer state as plain dicts, torch's layout.

        Returns
        -------
        dict
            ``{"state": {i: {"step": int, <name>: ndarray, ...}}, "param_groups":
            [{<hyper-parameters>, "params": [i, ...]}]}`` where ``i`` numbers the layers
            in order across groups. As in torch, the arrays are the optimizer's own
            (not copies): ``copy.deepcopy`` the result to keep a snapshot while training
            goes on. The dict pickles.
        """
        groups = []
        i = 0
        for group in self.param_groups:
            g = {k: v for k, v in group.items() if k != "params"}
            g["params"] = list(range(i, i + len(group["params"])))
            i += len(group["params"])
            groups.append(g)
        state = {k: dict(v) for k, v in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore hyper-parameters and state saved by :meth:`state_dict`.

        The state arrays are copied (cast to each table's dtype, float32 for a float16
        table). Everything is checked before anything changes.

        Raises
        ------
        ValueError
            A different number of groups or of layers per group, an unknown layer index,
            a hyper-parameter this optimizer does not have (as the constructor), or a
            state array whose shape does not fit its table.
        """
        try:
            groups = state_dict["param_groups"]
            saved_state = state_dict["state"]
        except (KeyError, TypeError):
            raise ValueError("state_dict must have 'state' and 'param_groups' entries") from None
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(groups)} parameter groups, the optimizer "
                f"has {len(self.param_groups)}"
            )
        index = {}
        group_of = {}
        new_groups = []
        for saved, group in zip(groups, self.param_groups):
            ids = list(saved["params"])
            if len(ids) != len(group["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match "
                    f"the size of optimizer's group ({len(ids)} vs {len(group['params'])})"
                )
            # (a torch checkpoint's maximize=True would otherwise be dropped silently)
            self._check_known(saved)
            hyper = dict(self.defaults)
            hyper.update({k: v for k, v in saved.items() if k != "params"})
            self._check_group(hyper)
            hyper["params"] = group["params"]
            new_groups.append(hyper)
            for saved_id, layer in zip(ids, group["params"]):
                index[saved_id] = layer
                group_of[id(layer)] = hyper
        new_state = {}
        order = {id(layer): i for i, layer in enumerate(self._layers())}
        for key, st in saved_state.items():
            if key not in index:
                raise ValueError(f"loaded state refers to an unknown param index {key!r}")
            layer = index[key]
            i = order[id(layer)]
            weight = layer.weight
            new = {"step": _check_step(st.get("step", 0))}
            for name, shape in self._state_shapes(group_of[id(layer)], weight).items():
                if st.get(name) is None:
                    continue  # allocated on the next update
                arr = st[name] if hasattr(st[name], "__cuda_array_interface__") \
                    else np.asarray(st[name])
                if arr.shape != shape:
                    raise ValueError(
                        f"loaded state {name!r} of param {key} has shape {arr.shape}, "
                        f"expected {shape}"
                    )
                new[name] = backend_of(weight).xp.array(
                    arr, dtype=_half.compute_dtype(weight.dtype), order="C", copy=True)
            new_state[i] = new
        for hyper, group in zip(new_groups, self.param_groups):
            group.clear()
            group.update(hyper)
        self.state = new_state
        self._step_files = {}  # the new state is no mapped checkpoint's
        self._reindex()


def _is_dense(grad):
    """A dense gradient (numpy or CuPy array), as opposed to a sparse matrix."""
    return isinstance(grad, np.ndarray) or hasattr(grad, "__cuda_array_interface__")


def _check_step(step):
    s = float(step)
    if not (s >= 0) or s != int(s):
        raise ValueError(f"loaded step must be a non-negative integer, got {step!r}")
    return int(s)


class SGD(Optimizer):
    """Stochastic gradient descent, optionally with momentum and weight decay.

    ``d = g + weight_decay * w``; with momentum, ``buf = momentum * buf +
    (1 - dampening) * d`` (the table's first step sets ``buf = d``, as torch does) and
    ``d = buf``, or ``d = d + momentum * buf`` with ``nesterov``; then ``w -= lr * d``.

    Parameters
    ----------
    params : iterable of layers, or of dicts (parameter groups)
    lr : float, default 1e-3
        Learning rate (>= 0). The contract lists it first without a default; 1e-3 is
        torch 2.x's default.
    momentum : float, default 0.0
        Momentum factor (>= 0).
    weight_decay : float, default 0.0
        L2 penalty (>= 0).
    dampening : float, default 0.0
        Keyword-only (torch's 4th positional argument; the contract's order puts
        ``weight_decay`` there).
    nesterov : bool, default False
        Keyword-only; needs ``momentum > 0`` and ``dampening == 0``.

    Notes
    -----
    With a dense gradient every row follows torch's update, up to the last bit: torch's
    CPU kernel fuses ``w - lr * g`` into one multiply-add, ours rounds the product
    first (no fused multiply-adds anywhere, so every CPU gives the same bits), which
    can move a float32 weight by one unit in the last place. With a row-sparse gradient
    (and in the fused backward) the update is lazy: only the touched rows are decayed
    and only their momentum buffers are updated and applied; untouched rows keep their
    weights and buffers (torch keeps a sparse momentum buffer that keeps moving rows
    whose gradient is gone, and refuses weight decay with sparse gradients).
    State: ``momentum_buffer`` (num_embeddings, dim) when ``momentum > 0``.
    """

    _kind = _optim.KIND_SGD

    def __init__(self, params, lr=1e-3, momentum=0.0, weight_decay=0.0, *, dampening=0.0,
                 nesterov=False):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "dampening": dampening, "nesterov": nesterov})

    def _state_keys_for(self, group):
        return (("momentum_buffer", "dim"),) if group["momentum"] != 0 else ()

    @staticmethod
    def _check_group(group):
        _check_number(group["lr"], "learning rate")
        _check_number(group["momentum"], "momentum")
        _check_number(group["weight_decay"], "weight_decay")
        _check_number(group["dampening"], "dampening")
        if not isinstance(group["nesterov"], (bool, np.bool_)):
            raise ValueError(f"Invalid nesterov value: {group['nesterov']!r} (expected a bool)")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                "Nesterov momentum requires a momentum and zero dampening, got "
                f"momentum={group['momentum']!r}, dampening={group['dampening']!r}"
            )

    @staticmethod
    def _hyper(group, st, created):
        first = 1.0 if "momentum_buffer" in created else 0.0
        return (float(group["lr"]), float(group["momentum"]), float(group["weight_decay"]),
                0.0, 1.0 - float(group["dampening"]), first, 1.0 if group["nesterov"] else 0.0)


class Adagrad(Optimizer):
    """Adagrad (torch's formulas).

    ``d = g + weight_decay * w``; ``sum += d**2``;
    ``w -= clr * d / (sqrt(sum) + eps)`` with ``clr = lr / (1 + (step - 1) * lr_decay)``
    and ``step`` the number of updates of that table so far (this one included).

    Parameters
    ----------
    params : iterable of layers, or of dicts (parameter groups)
    lr : float, default 1e-2
    lr_decay : float, default 0.0
    weight_decay : float, default 0.0
    initial_accumulator_value : float, default 0.0
        Starting value of every ``sum`` entry.
    eps : float, default 1e-10

    Notes
    -----
    With a row-sparse gradient (and in the fused backward) only the touched rows are
    updated, as in torch. torch refuses ``weight_decay`` with sparse gradients; here it
    is applied lazily, to the touched rows only. State: ``sum`` (num_embeddings, dim)
    and ``step``.
    """

    _kind = _optim.KIND_ADAGRAD
    _state_keys = (("sum", "dim"),)

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10):
        super().__init__(params, {"lr": lr, "lr_decay": lr_decay, "weight_decay": weight_decay,
                                  "initial_accumulator_value": initial_accumulator_value,
                                  "eps": eps})

    @staticmethod
    def _check_group(group):
        _check_number(group["lr"], "learning rate")
        _check_number(group["lr_decay"], "lr_decay")
        _check_number(group["weight_decay"], "weight_decay")
        _check_number(group["initial_accumulator_value"], "initial_accumulator_value")
        _check_number(group["eps"], "epsilon")

    def _new_state_array(self, key, group, shape, dtype, xp=np):
        if xp is np:
            return _aligned.full(shape, group["initial_accumulator_value"], dtype)
        return xp.full(shape, group["initial_accumulator_value"], dtype=dtype)

    @staticmethod
    def _hyper(group, st, created):
        clr = group["lr"] / (1 + (st["step"] - 1) * group["lr_decay"])
        return float(clr), 0.0, float(group["weight_decay"]), float(group["eps"]), 0.0, 0.0, 0.0


class SparseAdam(Optimizer):
    """Adam for sparse gradients (torch's ``SparseAdam``): lazy moments.

    For each touched row: ``m += (1 - b1) * (g - m)``, ``v += (1 - b2) * (g**2 - v)``,
    ``w -= lr * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps)``, with ``t`` the
    table's global step count (not the row's). Rows outside the gradient keep their
    weights and moments.

    Parameters
    ----------
    params : iterable of sparse layers (``sparse=True``), or of dicts
    lr : float, default 1e-3
        Must be > 0 (torch's check).
    betas : (float, float), default (0.9, 0.999)
        Each in [0, 1).
    eps : float, default 1e-8
        Must be > 0.

    Raises
    ------
    ValueError
        A layer whose ``sparse`` attribute is not true ("SparseAdam does not support
        dense gradients"), at construction; a dense ``grad`` at ``step``.

    Notes
    -----
    State: ``exp_avg``, ``exp_avg_sq`` (num_embeddings, dim) and ``step``.
    """

    _kind = _optim.KIND_SPARSE_ADAM
    _state_keys = (("exp_avg", "dim"), ("exp_avg_sq", "dim"))

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @staticmethod
    def _check_group(group):
        _check_number(group["lr"], "learning rate", low_inclusive=False)
        _check_number(group["eps"], "epsilon", low_inclusive=False)
        betas = group["betas"]
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"Invalid betas: {betas!r} (expected a pair of floats)") from None
        _check_number(b1, "beta parameter at index 0", high=1.0)
        _check_number(b2, "beta parameter at index 1", high=1.0)
        group["betas"] = (float(b1), float(b2))

    def _check_layer_kind(self, layer):
        if not getattr(layer, "sparse", False):
            raise ValueError(
                f"SparseAdam does not support dense gradients: {layer!r} has sparse=False "
                "(use sparse=True, or Adagrad/SGD for dense layers)"
            )

    def _check_grad_kind(self, layer):
        if _is_dense(layer.grad):
            raise ValueError(
                "SparseAdam does not support dense gradients, please consider Adagrad or SGD"
            )

    @staticmethod
    def _hyper(group, st, created):
        b1, b2 = group["betas"]
        t = st["step"]
        step_size = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
        return float(step_size), 0.0, 0.0, float(group["eps"]), 1.0 - b1, 1.0 - b2, 0.0


class RowWiseAdagrad(Optimizer):
    """Adagrad with one accumulator per row (FBGEMM's row-wise Adagrad).

    ``d = g + weight_decay * w``; ``sum[r] += mean(d**2)``;
    ``w[r] -= lr * d / (sqrt(sum[r]) + eps)``. Its state is one number per row instead
    of one per weight: ``1 / embedding_dim`` of Adagrad's memory.

    Parameters
    ----------
    params : iterable of layers, or of dicts (parameter groups)
    lr : float, default 1e-2
    eps : float, default 1e-10
    weight_decay : float, default 0.0
        L2 penalty; with a sparse gradient applied to the touched rows only (lazy).

    Notes
    -----
    A dense gradient updates every row (rows with a zero gradient and no weight decay
    do not move, given ``eps > 0``: with ``eps = 0`` a row whose ``sum`` is still 0
    gets 0 / 0 = NaN, as torch's Adagrad does). Each row's mean of squares is
    computed in float64, then added to ``sum``, which has the table's dtype (float32
    for a float16 table). State: ``sum`` (num_embeddings,) and ``step``.
    """

    _kind = _optim.KIND_ROWWISE_ADAGRAD
    _state_keys = (("sum", 1),)

    def __init__(self, params, lr=1e-2, eps=1e-10, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})

    @staticmethod
    def _check_group(group):
        _check_number(group["lr"], "learning rate")
        _check_number(group["eps"], "epsilon")
        _check_number(group["weight_decay"], "weight_decay")

    @staticmethod
    def _hyper(group, st, created):
        return (float(group["lr"]), 0.0, float(group["weight_decay"]), float(group["eps"]),
                0.0, 0.0, 0.0)
