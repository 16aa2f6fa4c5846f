"""The virtual slots of a training run: a sample order that depends on the data, the seed and the
epoch only, not on the number of ranks or of loader workers.

A run has `slots` virtual slots (fixed when it starts, kept in its checkpoints). Each slot has its
own shards (the epoch's shuffled shard list dealt over the slots, `slot_plan`), its own shuffle
buffer and a per-sample augmentation seed. A global step of `global_batch` samples takes `take =
global_batch / slots` samples from every slot. The slots are grouped, in order, into the step's
`units = global_batch / micro` micro-batches of `per_unit = slots / units` slots each; with world
size W and accumulation A = units / W, rank r at accumulation step a serves unit r * A + a. So
each micro-batch holds the same samples on any world size that divides `units`, and only which
rank computes it, and so the order of the gradient reduction, changes.

Repeated augmentation (`data.repeated_aug` R > 1, DeiT's RASampler): every sample is shown R times,
each copy with its own augmentation, on R different ranks when there are at least R (on fewer, in
R different micro-batches); the epoch keeps its steps, so it shows a 1/R share of the samples R
times each. Each slot still reads its own shards as its source stream, and place p of slot j's
stream in the epoch shows copy k = p % R of the (p // R)-th sample of source slot j - k * shift
(mod slots), with `shift` = (units // R) whole units: the R copies of a sample lie in units u,
u + d, u + 2d, ... (d = units // R, all cyclic gaps >= d), and a rank holds A = units / world
consecutive units, A <= d whenever world >= R. Any layout with at least R units holds it. A
slot whose places in an epoch are not a multiple of R ends it with its last sample shown fewer
than R times (as RASampler's cut does).
"""
from __future__ import annotations

from dataclasses import dataclass

from cvtkit.config_loader import ConfigError

DEFAULT_MAX_SLOTS = 256  # the default layout serves world sizes up to this many ranks


def slot_plan(num_shards: int, slots: int, slot: int) -> tuple[list[int], int, int]:
    """Which shards slot `slot` reads, and the sample stride and phase within them: with at least
    as many shards as slots, slot s reads shards s, s + slots, ...; with fewer, the slots sharing
    a shard take every k-th sample of it, so no slot is empty."""
    if num_shards >= slots:
        return list(range(slot, num_shards, slots)), 1, 0
    shard = slot % num_shards
    sharing = len(range(shard, slots, num_shards))  # slots that read this shard
    return [shard], sharing, slot // num_shards


def default_slots(global_batch: int, micro: int, shards: int = 0) -> int:
    """The slots of a run that does not set `data.slots`: the most that divide the global batch, up
    to 256 and (given `shards`) up to the number of shards, so that no two slots read one shard
    (each would read all of it to keep its part); at least one per micro-batch unit."""
    units = global_batch // micro
    cap = min(DEFAULT_MAX_SLOTS, shards) if shards else DEFAULT_MAX_SLOTS
    fits = [v for v in range(units, global_batch + 1, units) if global_batch % v == 0 and v <= cap]
    return max(fits, default=units)


@dataclass(frozen=True)
class SlotLayout:
    """How a global batch is cut into slots and micro-batch units (module docstring)."""
    global_batch: int
    micro: int
    slots: int
    repeats: int = 1  # data.repeated_aug: the copies of each sample (module docstring)

    @classmethod
    def make(cls, global_batch: int, micro: int, slots: int = 0, shards: int = 0,
             repeats: int = 1) -> "SlotLayout":
        """`slots` 0: `default_slots`. A layout that cannot be cut is a one-line error."""
        slots = slots or default_slots(global_batch, micro, shards)
        units = global_batch // micro
        if global_batch % micro or global_batch % slots or slots % units:
            raise ConfigError(f"data.slots={slots}: the global batch {global_batch} in micro-batches of "
                              f"{micro} needs a slot count that divides {global_batch} and is a multiple "
                              f"of {units} (e.g. {default_slots(global_batch, micro, shards)})")
        if repeats > units:
            raise ConfigError(f"data.repeated_aug={repeats}: the copies of a sample go to {repeats} different "
                              f"micro-batches, but the global batch {global_batch} in micro-batches of {micro} "
                              f"has {units}; use data.repeated_aug <= {units} or a micro batch of at most "
                              f"{global_batch // repeats} (engine.micro_batch)")
        return cls(global_batch, micro, slots, repeats)

    @property
    def units(self) -> int:
        return self.global_batch // self.micro

    @property
    def per_unit(self) -> int:
        return self.slots // self.units

    @property
    def take(self) -> int:
        return self.global_batch // self.slots

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per step on each rank; a world size that does not divide the units is a
        one-line error naming those that do."""
        if self.units % world_size:
            sizes = [w for w in range(1, self.units + 1) if self.units % w == 0]
            raise ConfigError(f"{world_size} ranks cannot serve the {self.units} micro-batches of "
                              f"{self.micro} of each global batch of {self.global_batch} in the same "
                              f"order; the world sizes that can: {', '.join(map(str, sizes))}")
        return self.units // world_size

    def unit_slots(self, unit: int) -> range:
        return range(unit * self.per_unit, (unit + 1) * self.per_unit)

    def sources(self, slot: int) -> list[int]:
        """The source slot of each copy that `slot` shows: copy k of source s goes to slot
        s + k * shift (mod slots), `shift` being units // repeats whole units (module docstring)."""
        shift = self.units // self.repeats * self.per_unit
        return [(slot - k * shift) % self.slots for k in range(self.repeats)]
