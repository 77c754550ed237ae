"""What crosses the network, defined once and imported by both sides.

``secagg``: secure aggregation's stage records, masking record, sum settings and
metrics; ``dp``: client-level DP's config keys and metrics; ``he``: encrypted FedAvg's
records. Node-config floors live with the cores that enforce them
(:mod:`flower_privacy.secagg.floors`); run-config keys with
:mod:`flower_privacy.private.config`.
"""
