//! Seeded noise made on the host.
