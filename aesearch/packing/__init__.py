"""Packing: trials of one model shape trained fused in one step, and the pack server that hosts them.
"""
