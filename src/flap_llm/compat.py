"""flap-llm 0.1's flat keywords and saved configs, read into 0.2's per-method options.

0.1 wrote `PruneConfig(ratio=0.5, compensation="lsq")` and saved configs as flat dicts; 0.2 gives each method
its own options object. Here, and only here, the old keywords are mapped: a keyword that names a field of the
method's options fills it; obs's options that were deleted (measured worse, or made internal) are refused with
the reason, except where they hold the value that is now fixed. A saved config (`lenient`) drops what no longer
applies, since its plan is data and re-applies as it was.
"""

from __future__ import annotations

from .errors import FlapError
from .methods.base import Method, Options

# 0.1's obs options that are gone: the value each now has (accepted, and ignored), and why it went
_OBS_GONE = {
    "selection": ("obs", "FLAP's order within obs was an ablation that measured worse"),
    "sequential": (True, "obs always takes its refit's statistics from the pruned earlier layers (it measured better)"),
    "fisher_fraction": (None, "obs's Fisher share is internal now"),
    "select_damp": (None, "obs's greedy ridge is internal now"),
    "token_windows": (0, "per-token Fisher factors measured worse and were deleted"),
    "token_shrink": (None, "per-token Fisher factors measured worse and were deleted"),
    "token_reference": (None, "per-token Fisher factors measured worse and were deleted"),
}


def options_from_keywords(method: Method, legacy: dict, lenient: bool = False) -> Options | None:
    """The method's options from 0.1's flat keywords (None values are unset). `lenient` (reading a saved
    config): keywords of deleted options, and another method's keywords, are dropped."""
    given = {k: v for k, v in legacy.items() if v is not None}
    if method.options is None:
        if given and not lenient:
            raise FlapError(f"method {method.name} has no options (got {', '.join(sorted(given))})")
        return None
    mine = method.options.field_names()
    if method.name == "obs":
        return method.options(**_obs_keywords(given, mine, lenient))
    unknown = set(given) - mine
    if unknown and not lenient:
        raise FlapError(f"{', '.join(sorted(unknown))}: not an option of method {method.name} "
                        f"({method.options.__name__} takes {', '.join(sorted(mine))})")
    return method.options(**{k: v for k, v in given.items() if k in mine})


def _obs_keywords(given: dict, mine: set[str], lenient: bool) -> dict:
    opts = {}
    for key, value in given.items():
        if key in mine:
            if key == "allocation" and value == "structure" and lenient:
                continue  # a saved ablation: its plan is data and re-applies; the option is gone
            opts[key] = value
        elif key in _OBS_GONE:
            fixed, why = _OBS_GONE[key]
            if not (lenient or (fixed is not None and value == fixed)):
                raise FlapError(f"{key} is no longer an option of method obs: {why}; use "
                                "PruneConfig(method='obs', options=ObsOptions(...)) with allocation, lsq_damp")
        elif key == "compensation" and value in ("bias", "lsq"):
            continue  # obs always refits by least squares
        elif not lenient:
            raise FlapError(f"{key} is not an option of method obs; obs always refits by least squares and "
                            f"splits the budget by measured errors (ObsOptions takes {', '.join(sorted(mine))})")
    return opts
