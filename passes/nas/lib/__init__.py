"""Libraries of the NAS pass: the elastic space and supernet, and the subnet searches."""
