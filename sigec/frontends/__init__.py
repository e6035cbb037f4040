"""The ways in for people rather than programs: the ``sigec`` CLI, ``sigec dump``, the demo,
``sigec bench`` and the editor, with the small helpers they share (edit masks, measurements)."""
