"""Weight parking: the parameters a fast decode never reads wait in host memory.

A `Parking` belongs to one Decoder and its network. `park(names)` moves those parameters'
data to `to` (pinned host memory for a CUDA decoder; None parks nothing; "meta" keeps the
values aside and leaves a `Parked` tensor in their place, which raises on any use: how the
tests prove the fast path reads no parked weight) and `restore()` brings them back; each
Parameter keeps its identity, only its data moves, so nothing is added to the network.
Which parameters may wait is the fast model's answer (`FastPiD.unread_parameters`, from
its layers). Decoders sharing one network never park
while they do: one would not know to bring back what another parked (the registry below).
docs/design.md, "Memory, decided".
"""
from __future__ import annotations

import threading
import weakref

import torch
from torch.utils._pytree import tree_leaves

# The live owners (Decoders) of each network.
_owners_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_owners_lock = threading.Lock()


def moved(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A fresh copy of `t` on `device` (pinned when it is host memory for a CUDA tensor, so
    the copies back run at full PCIe speed), made outside inference mode: the copy becomes
    a parameter's data, which the user may later train or load_state_dict into."""
    with torch.inference_mode(False), torch.no_grad():
        pin = device.type == "cpu" and t.device.type == "cuda"
        return torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pin).copy_(t)


class Parked(torch.Tensor):
    """A weight parked to the meta device: its shape and dtype, no values, and any operation
    on it raises, naming the parameter. (A plain meta tensor would not do: a GEMM of a CPU
    input against a meta weight returns a CPU tensor of no meaning instead of raising.)"""

    @staticmethod
    def __new__(cls, shape, dtype, name: str, requires_grad: bool = False):
        t = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device="meta", requires_grad=requires_grad)
        t.parked_name = name
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:       # nn.Parameter(...) detaches its data once
            (t,) = args
            return Parked(t.shape, t.dtype, t.parked_name)
        names = sorted({a.parked_name for a in tree_leaves((args, kwargs)) if isinstance(a, Parked)})
        raise RuntimeError(f"{func} read the parked weight(s) {names}: parked weights must not be read")

    def __repr__(self):
        return f"Parked({self.parked_name!r}, shape={tuple(self.shape)}, dtype={self.dtype})"


class Parking:
    """The parked state of one owner's network. Call `park`, `restore` under `lock` (the
    owner's, re-entrant)."""

    def __init__(self, owner, net, to: torch.device | None, lock):
        self.owner, self.net, self.to, self.lock = owner, net, to, lock
        self.parked: dict = {}      # parameter name -> the device it came from
        self.aside: dict = {}       # parked to meta: parameter name -> the tensor holding its values
        self.users = 0              # blocks holding the whole net: never park under them
        adopt(owner, net)

    def park(self, names) -> None:
        """Move the named parameters' data to `to`; the Parameter objects stay."""
        if self.to is None or self.parked:      # the cheap check every fast decode makes
            return
        with self.lock:
            if self.parked or self.users or not sole_owner(self.owner, self.net):
                return
            params = dict(self.net.named_parameters())
            for name in names:
                p = params[name]
                self.parked[name] = p.device
                if self.to.type == "meta":
                    # no values where the net can reach them: any use raises (the values wait
                    # in the swapped-out tensor; a meta tensor cannot be a CPU Parameter's .data)
                    aside = torch.nn.Parameter(Parked(p.shape, p.dtype, name), requires_grad=p.requires_grad)
                    torch.utils.swap_tensors(p, aside)
                    self.aside[name] = aside
                else:
                    p.data = moved(p.data, self.to)

    def restore(self) -> None:
        """Bring parked parameters back to the devices they came from (under the lock)."""
        if not self.parked:
            return
        params = dict(self.net.named_parameters())
        for name, device in self.parked.items():
            if name in self.aside:
                torch.utils.swap_tensors(params[name], self.aside.pop(name))
            else:
                params[name].data = moved(params[name].data, device)
        self.parked = {}

    def switch(self, net) -> None:
        """The owner's network is replaced: restore the old one, register on the new one."""
        self.restore()
        with _owners_lock:
            _owners_of.get(self.net, weakref.WeakSet()).discard(self.owner)
        adopt(self.owner, net)
        self.net = net


def adopt(owner, net) -> None:
    """Register `owner` as a user of `net`, bringing back weights another one parked."""
    with _owners_lock:
        others = list(_owners_of.setdefault(net, weakref.WeakSet()))
        _owners_of[net].add(owner)
    for other in others:
        if other is not owner:
            other.reference_weights_on_device()


def sole_owner(owner, net) -> bool:
    with _owners_lock:
        return set(_owners_of.get(net, ())) == {owner}
