"""The two modes, one vocabulary: every folder, metric, file and config key says `think` (thinking
on: a sampled trace, the loss math's trace estimator g_t) or `nothink` (thinking off: the
template's empty think block, the empty-trace estimator g_e). The loss code keeps the paper's
trace/empty names for the two estimators; `think` is trace, `nothink` is empty."""

MODES = ("think", "nothink")


def mode_name(thinking: bool) -> str:
    return MODES[0] if thinking else MODES[1]
