"""Developer tools: the fault matrix (`python -m big_transfer.tools.fault_matrix`)."""
