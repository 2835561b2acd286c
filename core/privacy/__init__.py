"""The privacy accountant, σ calibration, the ledger store and distributed (secure-aggregation) noise."""
