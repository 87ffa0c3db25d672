//! `agent-runtime-server`: the documented HTTP API over `agent-runtime-core`.

fn main() {
    println!("agent-runtime-server: not yet serving");
}
