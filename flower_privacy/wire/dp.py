"""Keys that client-level DP's strategy and client mod share (defined once)."""

# In the train message's ConfigRecord "config": the L2 norm each client clips its update to.
CLIP_NORM = "dp-clip-norm"
# In the train reply's metrics: 1 if the update fitted under the clip norm, else 0.
UNCLIPPED = "dp-unclipped"
MOD_NAME = "flower_privacy.mods.client_clipping_mod"

# Metrics every private round reports (what the run log and PrivacyResult carry).
METRIC_EPSILON = "dp-epsilon"
METRIC_DELTA = "dp-delta"
METRIC_NOISE_MULTIPLIER = "dp-noise-multiplier"
METRIC_CLIP_NORM = "dp-clip-norm"  # the clip norm used this round
METRIC_UNCLIPPED_FRACTION = "dp-unclipped-fraction"  # adaptive clipping's noisy estimate
