"""triton_ops_core.aot's reading of machine code: which global loads in a loop make its steps wait for memory."""

from __future__ import annotations

from triton_ops_core.aot import misplaced_pairs, sync_loads_in_loop


def _loop(*instructions: str, filler: int = 0) -> list[str]:
    """nvdisasm-like lines: the instructions (an address comment each), ``filler`` independent ones after them."""
    body = list(instructions) + ["FFMA R200, R201, R202, R200 ;"] * filler + ["BRA `(.L_x_1) ;"]
    return [f"        /*{0x1000 + 16 * i:04x}*/                   {text}" for i, text in enumerate(body)]


def test_a_load_read_in_its_own_step_waits():
    # the row's element loaded and multiplied at once (session 20's one-row tile: FP8 experts 1.75x slower)
    assert sync_loads_in_loop(_loop("@!P3 LDG.E.U16 R8, desc[UR10][R2.64+-0x30] ;", "SHF.L.U32 R9, R8, 0x10, RZ ;",
                                    filler=40)) == 1


def test_a_load_kept_for_the_next_step_does_not_wait():
    # read only by the loop's last instructions (the next step's value kept in a register), or not at all
    assert sync_loads_in_loop(_loop("LDG.E.U16 R144, desc[UR14][R2.64] ;", filler=40)[:-1]
                              + _loop("PRMT R203, R144, 0x7610, R203 ;")[-2:]) == 0
    assert sync_loads_in_loop(_loop("LDG.E.U16 R144, desc[UR14][R2.64] ;", filler=10)) == 0


def test_wide_loads_address_reads_and_overwrites():
    # a 128-bit load fills four registers: reading the third waits
    assert sync_loads_in_loop(_loop("LDG.E.128 R4, desc[UR8][R2.64] ;", "FADD R20, R6, R21 ;", filler=8)) == 1
    # a register used as an address waits too
    assert sync_loads_in_loop(_loop("LDG.E R4, desc[UR8][R2.64] ;", "STS [R4+0x10], R9 ;", filler=8)) == 1
    # written again before any read: the load's value is never waited for
    assert sync_loads_in_loop(_loop("LDG.E R4, desc[UR8][R2.64] ;", "MOV R4, R9 ;", "FADD R5, R4, R4 ;",
                                    filler=8)) == 0
    # asynchronous copies into shared memory are not plain loads
    assert sync_loads_in_loop(_loop("LDGSTS.E.BYPASS.128 [R17+0x1000], desc[UR14][R2.64], P0 ;",
                                    "IADD3 R30, R17, 0x10, RZ ;", filler=8)) == 0


def test_instructions_out_of_their_order_are_named():
    ptx = "prefetch.global.L2 [%rd1];\nld.global.u8 %rs1, [%rd2];\ngriddepcontrol.wait;\nst.global.b32 [%rd3], %r1;"
    assert misplaced_pairs(ptx, (("prefetch.global.L2", "griddepcontrol.wait"), ("griddepcontrol.wait", "st.global"))) \
        == []
    assert misplaced_pairs(ptx, (("st.global", "ld.global"),)) == [("st.global", "ld.global")]
    # either one missing: misplaced too
    assert misplaced_pairs(ptx, (("griddepcontrol.launch_dependents", "st.global"), ("ld.global", "bar.sync"))) == [
        ("griddepcontrol.launch_dependents", "st.global"), ("ld.global", "bar.sync")]
