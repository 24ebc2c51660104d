"""Assembly and validation: the bridge, the bridged artifact, the weight-space baseline
and the report that compares them."""
