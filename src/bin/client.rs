//! The `client` program: see [`trireme::cli::client_main`].

/// Runs the program and exits with its code.
fn main() {
    std::process::exit(trireme::cli::client_main());
}
