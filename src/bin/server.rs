//! The `server` program: see [`trireme::cli::server_main`].

/// Runs the program and exits with its code.
fn main() {
    std::process::exit(trireme::cli::server_main());
}
