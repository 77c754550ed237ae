"""Server-side strategy wrappers for Flower's Message API."""

from flower_privacy.strategies.client_level_dp import ClientLevelDP
from flower_privacy.strategies.encrypted_fedavg import EncryptedFedAvg
from flower_privacy.strategies.result import PrivacyResult
from flower_privacy.strategies.secure_aggregation import SecureAggregation
from flower_privacy.strategies.strict_rounds import StrictRounds

__all__ = ["ClientLevelDP", "EncryptedFedAvg", "PrivacyResult", "SecureAggregation", "StrictRounds"]
