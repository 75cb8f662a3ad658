"""Developer tools: a local multi-process cluster, benchmark timing and FLOP counting, and
profiler-trace summaries. Nothing here is imported by a training run.
"""
