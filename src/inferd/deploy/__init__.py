"""Running inferd on existing serving platforms (Ray Serve; KServe manifests live in deploy/)."""
