"""Labels: the SQLite label store and budget ledger, and the oracles that sell labels (§6)."""
from .oracles import (CallableOracle, DelayedGoldOracle, GoldOracle, Oracle, OracleResult,
                      QueueOracle, SimulationOnlyError)
from .store import LabelStore, LabelStoreError, LedgerRow, StoredLabel

__all__ = ["CallableOracle", "DelayedGoldOracle", "GoldOracle", "Oracle", "OracleResult",
           "QueueOracle", "SimulationOnlyError", "LabelStore", "LabelStoreError", "LedgerRow",
           "StoredLabel"]
