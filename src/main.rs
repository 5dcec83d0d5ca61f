//! The `ringkv` command line.

fn main() {
    eprintln!("ringkv: the node is not built yet; see README.md");
    std::process::exit(2);
}
