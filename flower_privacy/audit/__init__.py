"""The attack lab behind ``flower-privacy audit``: what an attacker learns from a
configuration.

The attack cores (:mod:`.inversion`, :mod:`.imprint`, :mod:`.metrics`,
:mod:`.empirical_eps`) know nothing of Flower: numpy arrays and torch models in and
out. :mod:`.runner` runs an app in-process and extracts each party's view;
:mod:`.attacks` plays the attackers on those views; :mod:`.report` writes the page.
"""

from flower_privacy.audit.hook import AuditHook, LocalTraining, load_hook

__all__ = ["AuditHook", "LocalTraining", "load_hook"]
