"""The cluster: shards placed by consistent hashing, owned by leases in the store, mirrored to
backups over heartbeats, reached from any node by one-hop forwarding."""
