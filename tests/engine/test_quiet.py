"""quiet_warnings: warnings silenced in a block, whichever threads enter and leave."""
from __future__ import annotations

import threading
import warnings

import pytest

from livestack.engine.quiet import quiet_warnings


def reader_inside_while_main_leaves(quiet) -> object:
    """The main thread's block begins, a reader's begins, the main thread's ends, then the reader warns: what its
    warnings.warn did (True: silenced; the warning: raised under the "error" filter)."""
    inside, left, result = threading.Event(), threading.Event(), {}

    def reader():
        with quiet():
            inside.set()
            left.wait(5)
            try:
                warnings.warn("a non-standard SIMPLE card", UserWarning)
                result["ok"] = True
            except UserWarning as err:
                result["ok"] = err

    t = threading.Thread(target=reader)
    with quiet():
        t.start()
        inside.wait(5)
    left.set()
    t.join(5)
    return result["ok"]


def plain_catch_warnings():
    class Quiet:
        def __enter__(self):
            self.cm = warnings.catch_warnings()
            self.cm.__enter__()
            warnings.simplefilter("ignore")

        def __exit__(self, *exc):
            self.cm.__exit__(*exc)

    return Quiet()


def test_a_block_still_running_in_another_thread_stays_quiet():
    # The read-ahead thread reads a FITS file with odd cards while the main thread leaves its own block (astropy
    # parsing a WCS): with warnings.catch_warnings() the main thread's exit restored the filters — "error" under
    # the tests — and the reader's warning escaped (test_stack_folder_with_a_corrupt_file failed in CI).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(reader_inside_while_main_leaves(plain_catch_warnings), UserWarning)   # the race
        # (… which then left "ignore" in force: the reader's exit restored what it saw when it entered)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reader_inside_while_main_leaves(quiet_warnings) is True
        with pytest.raises(UserWarning):        # the last block left: the filters are back
            warnings.warn("after", UserWarning)
