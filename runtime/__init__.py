"""clipfuse.runtime: everything that serves an engine folder.

Image loading and preprocessing, the manifest reader, backends behind one
interface. Needs neither open_clip nor the training code.
"""
