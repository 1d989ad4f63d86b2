//! The `viewleader` program: see [`trireme::cli::viewleader_main`].

/// Runs the program and exits with its code.
fn main() {
    std::process::exit(trireme::cli::viewleader_main());
}
