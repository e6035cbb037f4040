"""The ways in for people rather than programs: the ``sigec`` CLI, ``sigec dump``, the demo and
``sigec bench``, with the small helpers they share (edit masks, measurements)."""
