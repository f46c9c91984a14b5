//! Every tenth line of every NDJSON file in a directory, compressed one body at a time with LZ4
//! and with zstd (levels 1 and 3): the size ratio, and the CPU per body to compress and to
//! decompress (the latter averaged over five passes).

use std::io::BufRead;
use std::time::Instant;

fn main() {
    let dir = std::env::args().nth(1).expect("usage: body-compression NDJSON_DIR");
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("reading the directory") {
        let file = std::fs::File::open(entry.expect("a directory entry").path()).expect("opening a file");
        for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
            if index % 10 == 0 {
                bodies.push(line.expect("reading a line").into_bytes());
            }
        }
    }
    let raw: usize = bodies.iter().map(Vec::len).sum();
    let per_body = |seconds: f64| seconds * 1e6 / bodies.len() as f64;
    println!("bodies {} mean {} B", bodies.len(), raw / bodies.len());

    let started = Instant::now();
    let compressed: Vec<Vec<u8>> = bodies.iter().map(|body| lz4_flex::compress_prepend_size(body)).collect();
    let compress = started.elapsed().as_secs_f64();
    let size: usize = compressed.iter().map(Vec::len).sum();
    let started = Instant::now();
    for _ in 0..5 {
        for body in &compressed {
            std::hint::black_box(lz4_flex::decompress_size_prepended(body).expect("lz4"));
        }
    }
    let decompress = started.elapsed().as_secs_f64() / 5.0;
    println!(
        "lz4: ratio {:.2} compress {:.2} us/body decompress {:.3} us/body",
        raw as f64 / size as f64,
        per_body(compress),
        per_body(decompress)
    );

    for level in [1, 3] {
        let mut compressor = zstd::bulk::Compressor::new(level).expect("zstd");
        let started = Instant::now();
        let compressed: Vec<Vec<u8>> = bodies.iter().map(|body| compressor.compress(body).expect("zstd")).collect();
        let compress = started.elapsed().as_secs_f64();
        let size: usize = compressed.iter().map(Vec::len).sum();
        let mut decompressor = zstd::bulk::Decompressor::new().expect("zstd");
        let started = Instant::now();
        for _ in 0..5 {
            for (body, original) in compressed.iter().zip(&bodies) {
                std::hint::black_box(decompressor.decompress(body, original.len()).expect("zstd"));
            }
        }
        let decompress = started.elapsed().as_secs_f64() / 5.0;
        println!(
            "zstd{level}: ratio {:.2} compress {:.2} us/body decompress {:.3} us/body",
            raw as f64 / size as f64,
            per_body(compress),
            per_body(decompress)
        );
    }
}
