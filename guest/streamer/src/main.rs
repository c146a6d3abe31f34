//! `airlock-streamer`: placeholder until the streamer lands.

fn main() {}
