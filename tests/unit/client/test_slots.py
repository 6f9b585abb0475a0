"""The client's slot ring: who owns each slot, and the only transitions there are.

FREE -> FILLING (the trainer takes it) -> SUBMITTED (submit sent) -> DAEMON (accepted) -> FREE
(released); FILLING -> FREE (the daemon never saw it); SUBMITTED -> FREE (refused). Anything the
daemon says that names no slot in the state it implies is refused (the link is then dropped), and
a lost connection takes every slot out of the ring at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ckptd_client.slots import Ring, Slot, SlotState


@pytest.fixture
def ring() -> Iterator[Ring]:
    ring = Ring()
    yield ring
    ring.abandon()
    ring.close_abandoned()


def state(slot: Slot) -> SlotState:
    """The slot's state, read afresh (mypy would otherwise narrow it across calls)."""
    return slot.state


def seq_of(slot: Slot) -> int | None:
    return slot.seq


def new_slot(ring: Ring, slot_id: int = 0) -> Slot:
    slot = Slot(slot_id, 1 << 20, "ring")
    ring.add(slot)
    return slot


def test_a_slot_goes_round_the_ring(ring: Ring) -> None:
    slot = new_slot(ring)
    assert state(slot) is SlotState.FILLING
    ring.submitting(slot, seq=7)
    assert state(slot) is SlotState.SUBMITTED
    assert seq_of(slot) == 7
    assert ring.answered({"op": "accepted", "seq": 7})
    assert state(slot) is SlotState.DAEMON
    assert ring.free() == []
    assert ring.answered({"op": "released", "seq": 7, "slot": 0})
    assert state(slot) is SlotState.FREE
    assert seq_of(slot) is None
    assert ring.free() == [slot]
    ring.take(slot)
    assert state(slot) is SlotState.FILLING


def test_a_refused_submit_frees_the_slot(ring: Ring) -> None:
    slot = new_slot(ring)
    ring.submitting(slot, seq=3)
    assert ring.answered({"op": "refused", "seq": 3})
    assert state(slot) is SlotState.FREE


@pytest.mark.parametrize(
    ("state_seq", "msg"),
    [
        # released before accepted: the daemon never says that
        ("submitted", {"op": "released", "seq": 5, "slot": 0}),
        # a reply for another submit (a stale one)
        ("submitted", {"op": "accepted", "seq": 4}),
        # accepted twice
        ("daemon", {"op": "accepted", "seq": 5}),
        # released with the wrong slot id
        ("daemon", {"op": "released", "seq": 5, "slot": 9}),
        # refused after accepted
        ("daemon", {"op": "refused", "seq": 5}),
        # anything about a slot that is being filled
        ("filling", {"op": "released", "seq": 5, "slot": 0}),
    ],
)
def test_answers_that_fit_no_slot_are_refused(
    ring: Ring, state_seq: str, msg: dict[str, object]
) -> None:
    slot = new_slot(ring)
    if state_seq in ("submitted", "daemon"):
        ring.submitting(slot, seq=5)
    if state_seq == "daemon":
        assert ring.answered({"op": "accepted", "seq": 5})
    before = state(slot)
    assert not ring.answered(msg)
    assert slot.state is before


def test_the_trainer_cannot_take_or_give_back_out_of_turn(ring: Ring) -> None:
    slot = new_slot(ring)
    ring.submitting(slot, seq=1)
    with pytest.raises(AssertionError, match="submitted -> filling"):
        ring.take(slot)
    with pytest.raises(AssertionError, match="submitted -> free"):
        ring.give_back(slot)
    with pytest.raises(AssertionError, match="submitted -> submitted"):
        ring.submitting(slot, seq=2)


def test_a_lost_link_abandons_every_slot_even_one_being_filled(ring: Ring) -> None:
    filling, held = new_slot(ring, 0), new_slot(ring, 1)
    ring.submitting(held, seq=1)
    assert ring.answered({"op": "accepted", "seq": 1})
    ring.abandon()
    assert ring.slots == [] and set(ring.abandoned) == {filling, held}
    ring.give_back(filling)  # the snapshot that was filling it fails; the slot stays gone
    assert state(filling) is SlotState.FILLING and ring.free() == []
    assert not ring.answered({"op": "released", "seq": 1, "slot": 1})
    ring.close_abandoned()
    assert ring.abandoned == []


def test_a_slot_too_small_is_taken_out_of_the_ring_to_be_replaced(ring: Ring) -> None:
    small = new_slot(ring)
    ring.give_back(small)
    ring.take_out(small)
    assert state(small) is SlotState.FILLING and ring.slots == [] and ring.abandoned == []
    small.close()
    held = new_slot(ring, 1)
    ring.submitting(held, seq=2)
    with pytest.raises(AssertionError, match="submitted -> filling"):
        ring.take_out(held)
    assert ring.slots == [held]
