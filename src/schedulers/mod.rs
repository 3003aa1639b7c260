//! Noise schedulers behind one trait that mirrors diffusers' scheduler API.
