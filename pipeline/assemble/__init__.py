"""Assembly and validation: the bridge, the bridged artifact, the weight-space baseline
and the report that compares them."""

OTHERS = ("prefix", "rest", "none")
"""The logit proxy's rules for target tokens without a byte-identical source token (LogitProxy's `others`)."""

PLAUSIBLE = 0.1
"""The logit proxy's default plausibility floor (LogitProxy's `plausible`): a token the
source + LoRA gives less than this fraction of its top token's probability gets no rise
from the LoRA (docs/results.md#the-proxys-eos-and-the-plausibility-floor)."""


def check_plausible(flag: str, value: float, error: type[ValueError] = ValueError) -> None:
    """The one refusal every command that builds a proxy gives for a floor outside [0, 1)."""
    if not 0 <= value < 1:
        raise error(f"{flag} {value}: a fraction of the top token's probability, in [0, 1)")
