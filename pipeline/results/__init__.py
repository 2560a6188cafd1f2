"""What a finished job leaves in ``results/<media-id>/``: the documents assembled from the chunk results
(``assemble``), the subtitle cues (``cues``), the writing of every result file and the manifest (``finalize``),
and the self-contained page that shows them (``viewer``, ``viewer_assets``)."""
