fn main() {
    println!("skiff {}", env!("CARGO_PKG_VERSION"));
}
