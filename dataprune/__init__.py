"""Dataset pruning: SSP, SemDeDup, DBP, KD-aided random subsets."""
